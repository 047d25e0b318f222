"""The engine set-up steps the distributed tests share, in the order training/loop.py runs them (without LoRA and
stage freezing): shard the experts once, tag their parameters, install the DeepSpeed MoE markers, optionally turn on
activation checkpointing, then build the engine."""

from __future__ import annotations

from typing import Any


def engine_for(model, ds_config: dict, ep_size: int, *, lr_schedule=None, param_groups=None,
               activation_checkpointing: bool = False, timeout_s: float = 60.0) -> Any:
    """An `EngineSetup` for `model` over `ep_size` EP ranks (every rank calls it with the same model and config)."""
    from omni_moe.training.deepspeed_moe import install_moe_markers, prepare_expert_parallel, tag_expert_parameters
    from omni_moe.training.engine import enable_activation_checkpointing, initialize_engine

    layout = prepare_expert_parallel(model, ep_size, timeout_s=timeout_s)
    tag_expert_parameters(model, ep_size)
    install_moe_markers(model, ep_size)
    if activation_checkpointing:
        enable_activation_checkpointing(model)
    return initialize_engine(model, ds_config, layout, param_groups=param_groups, lr_schedule=lr_schedule)
