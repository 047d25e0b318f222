"""What the checkpoints of training/engine_checkpoint.py need from DeepSpeed's internals.

  * loading DeepSpeed's own files (its optimizer partitions are `torch.save` pickles) with `weights_only=True`:
    DeepSpeed 0.19.8 itself calls `torch.load(weights_only=False)`, so `weights_only_deepspeed_loads` swaps in
    `SafeTorchCheckpointEngine`, which allows exactly the three DeepSpeed classes its optimizer state contains;
  * leaving DeepSpeed's module state out of its files (the weights live in our safetensors files: DeepSpeed would
    keep only data-parallel rank 0's experts, our markers not being real `deepspeed.moe.layer.MoE` experts);
  * the ZeRO fp32 master copy of every parameter, compared with the model's weights after a load
    (`check_master_weights`): a mismatch means the next step would overwrite the loaded weights from a stale copy.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from .checkpoint_files import safe_torch_load
from .engine import EngineSetup
from .rank_agreement import raise_if_any_rank_failed


class MasterWeightMismatchError(RuntimeError):
    """The optimizer's fp32 master copy of a parameter differs from the model's weights after a load."""


# ------------------------------------------------------------------------------------- DeepSpeed's files
def deepspeed_safe_globals() -> list[Any]:
    """The DeepSpeed classes inside its optimizer checkpoints (measured with 0.19.8, ZeRO 0-2, fp32/bf16): the
    loss scaler object, the ZeRO stage enum, the fragment-address dataclass of `param_slice_mappings`. Allowing
    them lets `weights_only=True` rebuild them (attribute assignment only; no code runs)."""
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, ZeroStageEnum, fragment_address]


def safe_checkpoint_engine(config_params: Any = None):
    """DeepSpeed's TorchCheckpointEngine, except that `load` never unpickles arbitrary objects."""
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

    class SafeTorchCheckpointEngine(TorchCheckpointEngine):
        def load(self, path: str, map_location: Any = None) -> Any:
            with torch.serialization.safe_globals(deepspeed_safe_globals()):
                return safe_torch_load(path, map_location=map_location)

    return SafeTorchCheckpointEngine(config_params)


@contextlib.contextmanager
def weights_only_deepspeed_loads(engine: Any):
    original = engine.checkpoint_engine
    engine.checkpoint_engine = safe_checkpoint_engine(getattr(engine, "_config", None))
    try:
        yield
    finally:
        engine.checkpoint_engine = original


@contextlib.contextmanager
def module_weights_left_out(engine: Any):
    """DeepSpeed's module-state hooks return nothing for the duration of a save (instance attributes shadowing the
    methods; DeepSpeed's MoE path calls `_get_non_moe_state_dict`, its dense path `module_state_dict`)."""
    engine._get_non_moe_state_dict = lambda full_state_dict: {}
    engine.module_state_dict = lambda *args, **kwargs: {}
    try:
        yield
    finally:
        del engine._get_non_moe_state_dict
        del engine.module_state_dict


def ignore_deepspeed_module_state(src: dict, dst: nn.Module) -> None:
    """`custom_load_fn` for DeepSpeed's module load: the weights come from our files, never from DeepSpeed's."""


# ------------------------------------------------------------------------------------------ master weights
def _flat_offset(tensor: torch.Tensor, flat: torch.Tensor, what: str) -> int:
    offset, rest = divmod(tensor.data_ptr() - flat.data_ptr(), tensor.element_size())
    if rest or offset < 0 or offset + tensor.numel() > flat.numel():
        raise RuntimeError(f"{what} is not a view of its optimizer group's flat buffer (DeepSpeed internals moved?)")
    return offset


def master_weight_fragments(engine: Any) -> list[tuple[str, torch.Tensor, torch.Tensor]]:
    """(parameter name, model weight fragment, fp32 master fragment) for every piece of master copy this rank holds.

    ZeRO 1/2 (`DeepSpeedZeroOptimizer`) and bf16 ZeRO-1 (`BF16_Optimizer`): each optimizer group is one flat buffer
    the model's parameters are views of; this rank's fp32 partition covers a slice of it, so each parameter
    overlapping that slice yields one fragment. bf16 ZeRO-0 (`FP16_UnfusedOptimizer`): one fp32 copy per
    parameter. fp32 ZeRO-0 (a plain torch optimizer): the parameters are their own master, nothing to compare."""
    names = {id(p): n for n, p in engine.module.named_parameters()}
    opt = engine.optimizer
    if hasattr(opt, "single_partition_of_fp32_groups"):
        groups = zip(opt.bit16_groups_flat, opt.round_robin_bit16_groups, opt.parallel_partitioned_bit16_groups,
                     opt.single_partition_of_fp32_groups, opt.real_dp_process_group, strict=True)
    elif hasattr(opt, "fp32_groups_flat_partition"):
        groups = zip(opt.bf16_groups_flat, opt.bf16_groups, opt.bf16_partitioned_groups,
                     opt.fp32_groups_flat_partition, opt.real_dp_process_group, strict=True)
    elif hasattr(opt, "fp32_groups") and hasattr(opt, "fp16_groups"):
        return [(names[id(p)], p.detach(), m.detach()) for lp, hp in zip(opt.fp16_groups, opt.fp32_groups, strict=True)
                for p, m in zip(lp, hp, strict=True)]
    else:
        return []
    fragments = []
    for flat, params, partitions, master, group in groups:
        part = partitions[dist.get_rank(group=group)]
        start = _flat_offset(part, flat, "a ZeRO partition")
        end = start + part.numel()
        for param in params:
            p_start = _flat_offset(param, flat, f"parameter {names[id(param)]}")
            low, high = max(start, p_start), min(end, p_start + param.numel())
            if low < high:
                fragments.append((names[id(param)], param.detach().view(-1)[low - p_start:high - p_start],
                                  master.detach()[low - start:high - start]))
    return fragments


def check_master_weights(setup: EngineSetup) -> int:
    """Collective: raise MasterWeightMismatchError on every rank unless, on every rank, the optimizer's fp32 master
    copy rounded to the model's dtype equals the model's weights exactly. Returns how many fragments this rank
    compared. A mismatch after a load means the optimizer state and the weight files disagree (the next step would
    silently overwrite the loaded weights from the stale master copy)."""
    fragments = master_weight_fragments(setup.engine)
    error = None
    for name, weight, master in fragments:
        if not torch.equal(master.to(weight.dtype), weight):
            diff = float((master.float() - weight.float()).abs().max())
            error = MasterWeightMismatchError(
                f"optimizer fp32 master copy of {name} differs from the loaded weights (max abs diff {diff:.3g})")
            break
    raise_if_any_rank_failed(error, "master weight check", (MasterWeightMismatchError,))
    return len(fragments)


__all__ = [
    "MasterWeightMismatchError", "check_master_weights", "deepspeed_safe_globals", "ignore_deepspeed_module_state",
    "master_weight_fragments", "module_weights_left_out", "safe_checkpoint_engine", "weights_only_deepspeed_loads",
]
