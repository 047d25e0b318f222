"""`parallelize`: everything distributed is applied here, once, in one fixed order.

    1. shard experts       each rank keeps its EP rank's experts (global ids rank::ep_size), creating the
                           expert-parallel and expert-data-parallel groups with the run's timeout
                           (training/deepspeed_moe.py, training/expert_parallel.py)
    2. stage model         the stage's MoE overrides and LoRA (PEFT) -- adapters land on the LOCAL experts, so this
                           comes after sharding; LoRA replaces parameters, so it comes before any hook or tag
    3. freeze plan         what the stage does not train: requires_grad off, row masks on partly frozen fused
                           experts (training/freeze.py); a stage that trains no expert keeps them row-masked in
                           a MoE group, because DeepSpeed's ZeRO-1/2 and bf16 optimizers assert one exists
    4. tag MoE params      every parameter inside the experts (LoRA factors included) `allreduce=False` with its
                           expert group's name: reduced over the expert-data-parallel group, not the world
    5. DeepSpeed markers   a parameter-less `deepspeed.moe.layer.MoE` child per MoE block (DeepSpeed's MoE
                           switch; training/deepspeed_moe.py)
    6. activation ckpt     non-reentrant recomputation per decoder layer
    7. engine              optimizer groups (decay / no decay / routers / masked experts, split into MoE groups),
                           `deepspeed.initialize` with the stage's LR schedule (training/lr_schedule.py), the MoE
                           setup verified (training/engine.py)

Steps 4-5 need the final parameters (after 2-3), step 7 the final modules. Nothing distributed happens anywhere else:
the loop (training/loop.py) takes the returned `Parallelized` as it is.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .deepspeed_moe import expert_parameters, install_moe_markers, prepare_expert_parallel, tag_expert_parameters
from .engine import EngineSetup, build_deepspeed_config, enable_activation_checkpointing, initialize_engine
from .expert_parallel import moe_blocks
from .freeze import (
    FreezePlan, MaskedExperts, _grouped_experts, apply_stage, local_global_ids, prepare_model_for_stage,
    trainable_param_groups,
)
from .lr_schedule import LRSchedule
from .recipe import ParallelSection, TrainSection
from .stage_spec import StageSpec


@dataclass
class Parallelized:
    setup: EngineSetup  # engine, optimizer, LR scheduler, expert-parallel layout
    model: nn.Module  # the module the engine trains (the stage's model: LoRA-wrapped when the stage asks)
    plan: FreezePlan


def parallelize(model: nn.Module, stage: StageSpec, parallel: ParallelSection, train: TrainSection,
                micro_batch_size: int) -> Parallelized:
    """Collective: steps 1-7 of the module docstring on `model` (built alike on every rank) for `stage`, with the
    recipe's `parallel` section (ep_size, zero_stage, precision) and `train` section (gradient accumulation,
    activation checkpointing, timeout_s)."""
    opt = stage.optimizer
    ds_config = build_deepspeed_config(
        micro_batch_size=micro_batch_size, gradient_accumulation_steps=train.gradient_accumulation_steps,
        zero_stage=parallel.zero_stage, precision=parallel.precision, gradient_clipping=opt.grad_clip,
        lr=opt.lr, betas=tuple(opt.betas), eps=opt.eps, weight_decay=opt.weight_decay,
    )
    schedule = LRSchedule(schedule=opt.schedule, warmup_steps=opt.warmup_steps, total_steps=stage.steps,
                          min_lr_ratio=opt.min_lr_ratio)
    layout = prepare_expert_parallel(model, parallel.ep_size, timeout_s=train.timeout_s)  # 1
    model = prepare_model_for_stage(model, stage)  # 2
    plan = apply_stage(model, stage)  # 3
    # LoRA adapters inside the experts are MoE parameters already: no frozen expert tensor needs to stay in the
    # optimizer then (at real scale that state is several GiB per rank)
    trains_inside_experts = any(p.requires_grad for p in expert_parameters(model))
    if not trains_inside_experts and (parallel.zero_stage in (1, 2) or parallel.precision == "bf16"):
        keep_frozen_experts_in_a_moe_group(model, plan)
    if moe_blocks(model):
        tag_expert_parameters(model, parallel.ep_size)  # 4
        install_moe_markers(model, parallel.ep_size)  # 5
    if train.activation_checkpointing:
        enable_activation_checkpointing(model)  # 6
    groups = trainable_param_groups(model, plan, opt.lr, opt.weight_decay, opt.router_lr_scale)
    setup = initialize_engine(model, ds_config, layout, param_groups=groups, lr_schedule=schedule)  # 7
    return Parallelized(setup=setup, model=model, plan=plan)


def keep_frozen_experts_in_a_moe_group(model: nn.Module, plan: FreezePlan) -> None:
    """DeepSpeed's ZeRO-1/2 and bf16 optimizers assert that an MoE model has at least one MoE parameter group, so a
    stage that trains no routed expert (alignment) cannot simply freeze them. Instead the expert tensors stay in the
    optimizer as fully row-masked tensors (training/freeze.py's mechanism): a hook zeroes every row of their gradient
    and their group has weight decay 0, so with a fresh AdamW their update is exactly 0 and they stay bitwise
    unchanged (at the cost of their optimizer state)."""
    names = {id(p): n for n, p in model.named_parameters()}
    for block in moe_blocks(model):
        experts = _grouped_experts(block)
        ids = tuple(local_global_ids(experts))
        for attr in ("gate_up_proj", "down_proj"):
            param = getattr(experts, attr)
            param.requires_grad_(True)
            plan.handles.append(param.register_hook(torch.zeros_like))
            plan.masked.append(MaskedExperts(names[id(param)], param, ids, ()))


__all__ = ["Parallelized", "keep_frozen_experts_in_a_moe_group", "parallelize"]
