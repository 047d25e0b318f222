"""The DeepSpeed engine: config generation and validation, building the engine for a model whose experts are already
set up for DeepSpeed (training/deepspeed_moe.py), the stage's LR schedule (training/lr_schedule.py), and a NaN/inf
step guard.

The optimizer gets MoE parameter groups (torch AdamW: nothing is JIT-compiled). ZeRO-3 is refused with a clear error.
The full reasoning, each point checked in DeepSpeed's source, is in docs/training.md ("Expert parallelism and ZeRO").
"""

from __future__ import annotations

import copy
import functools
import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from .deepspeed_moe import ExpertParallelLayout, check_ready_for_engine, expert_parameters
from .expert_parallel import moe_blocks
from .lr_schedule import LRSchedule, StageLRScheduler

logger = logging.getLogger(__name__)

SUPPORTED_ZERO_STAGES = (0, 1, 2)
# We rely on engine internals (MoE detection, group helpers, optimizer wrappers); tests fail loudly when they move.
SUPPORTED_DEEPSPEED = ("0.19.8", "0.20")  # [min, max)
PRECISIONS = ("fp32", "bf16")


# ----------------------------------------------------------------------------- config
def build_deepspeed_config(
    *,
    micro_batch_size: int,
    gradient_clipping: float | None,
    gradient_accumulation_steps: int = 1,
    zero_stage: int = 1,
    precision: str = "fp32",
    lr: float = 5e-4,
    betas: tuple[float, float] = (0.9, 0.98),
    eps: float = 1e-8,
    weight_decay: float = 0.01,
    steps_per_print: int = 1_000_000_000,
) -> dict[str, Any]:
    """A DeepSpeed JSON config (as a dict) from plain recipe settings.

    The global batch is `micro_batch_size x gradient_accumulation_steps x data-parallel world size` (DeepSpeed
    derives `train_batch_size`). Optimizer: torch AdamW (`torch_adam`; no compiled kernels), `lr` the base of groups
    that set none. `gradient_clipping`: clip the global gradient norm at this positive value; None turns clipping
    off (DeepSpeed's 0). No scheduler section: `initialize_engine` builds the stage's schedule (`lr_schedule=`).
    bf16 keeps fp32 master weights; gradients accumulate in fp32 at ZeRO 1/2.
    """
    if zero_stage not in SUPPORTED_ZERO_STAGES:
        raise ValueError(f"zero_stage must be one of {SUPPORTED_ZERO_STAGES}, got {zero_stage} ({_ZERO3_REASON})")
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if micro_batch_size < 1 or gradient_accumulation_steps < 1:
        raise ValueError("micro_batch_size and gradient_accumulation_steps must be >= 1")
    if gradient_clipping is not None and not (
        isinstance(gradient_clipping, (int, float)) and not isinstance(gradient_clipping, bool)
        and math.isfinite(gradient_clipping) and gradient_clipping > 0
    ):
        raise ValueError(f"gradient_clipping must be a positive number or None (no clipping), got {gradient_clipping!r}")
    config: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": micro_batch_size,
        "gradient_accumulation_steps": gradient_accumulation_steps,
        "gradient_clipping": 0.0 if gradient_clipping is None else float(gradient_clipping),
        "steps_per_print": steps_per_print,
        "wall_clock_breakdown": False,
        "optimizer": {
            "type": "AdamW",
            "params": {
                "lr": lr, "betas": list(betas), "eps": eps, "weight_decay": weight_decay, "torch_adam": True,
            },
        },
        "zero_optimization": {"stage": zero_stage},
        "zero_allow_untested_optimizer": False,
    }
    if zero_stage in (1, 2):
        # DeepSpeed's MoE path in ZeRO 1/2 requires contiguous gradients and reduce-scatter; overlap_comm only
        # helps with a separate comm stream (GPU).
        config["zero_optimization"].update(
            contiguous_gradients=True, reduce_scatter=True, overlap_comm=torch.cuda.is_available()
        )
    if precision == "bf16":
        config["bf16"] = {"enabled": True, "check_grad_overflow": True}
        if zero_stage in (1, 2):
            # fp32 gradient accumulation; DeepSpeed 0.19.8 rejects it at ZeRO-0 (bf16 grads, fp32 master weights)
            config["data_types"] = {"grad_accum_dtype": "fp32"}
    return config


def load_deepspeed_config(config: dict[str, Any] | str | Path) -> dict[str, Any]:
    """A user's DeepSpeed config: a dict (deep-copied) or a path to a JSON file."""
    if isinstance(config, dict):
        return copy.deepcopy(config)
    path = Path(config)
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"DeepSpeed config file not found: {path}") from None
    except json.JSONDecodeError as err:
        raise ValueError(f"DeepSpeed config {path} is not valid JSON: {err}") from None


_ZERO3_REASON = (
    "ZeRO-3 is not supported for MoE models: DeepSpeed 0.19.8 refuses MoE modules under stage 3, and stage 3 would "
    "partition the expert tensors across ranks that hold different experts. Use ZeRO-1 or ZeRO-2"
)


def validate_deepspeed_config(config: dict[str, Any], has_moe: bool) -> dict[str, Any]:
    """Refuse what we do not support, with the reason; fill the settings the MoE path requires. Returns the config."""
    zero = config.setdefault("zero_optimization", {"stage": 0})
    stage = int(zero.get("stage", 0))
    if stage == 3 and has_moe:
        raise ValueError(_ZERO3_REASON)
    if stage not in SUPPORTED_ZERO_STAGES:
        raise ValueError(f"zero_optimization.stage must be one of {SUPPORTED_ZERO_STAGES}, got {stage}")
    for key in ("offload_optimizer", "offload_param"):
        device = (zero.get(key) or {}).get("device", "none")
        if device not in (None, "none"):
            raise ValueError(
                f"zero_optimization.{key}.device={device!r} is not supported: offloading needs DeepSpeed's compiled "
                "CPU Adam, which this codebase never builds"
            )
    if has_moe and stage in (1, 2):
        for key in ("contiguous_gradients", "reduce_scatter"):
            if zero.get(key) is False:
                raise ValueError(f"zero_optimization.{key}=false is not supported with MoE by DeepSpeed 0.19.8")
            zero[key] = True
    if config.get("fp16", {}).get("enabled"):
        raise ValueError("fp16 is not supported (use bf16 or fp32)")
    # a non-finite gradient must make DeepSpeed skip the step (and the loop count it: training/loop.py), never be
    # applied: bf16's overflow check and ZeRO's grad norm (where fp32 detects it) are forced on
    if (config.get("bf16") or {}).get("enabled"):
        if config["bf16"].get("check_grad_overflow") is False:
            logger.warning("DeepSpeed config: bf16.check_grad_overflow=false overridden to true (non-finite "
                           "gradients must skip the step)")
        config["bf16"]["check_grad_overflow"] = True
    if zero.get("compute_grad_norm") is False:
        logger.warning("DeepSpeed config: zero_optimization.compute_grad_norm=false overridden to true (ZeRO finds "
                       "non-finite gradients through the grad norm)")
        zero["compute_grad_norm"] = True
    optimizer = config.get("optimizer")
    if optimizer and str(optimizer.get("type", "")).lower() in ("adam", "adamw"):
        # torch's AdamW: DeepSpeed's FusedAdam / CPUAdam would be JIT-compiled on first use (~45 s, ~5 GB on CPU)
        optimizer.setdefault("params", {}).setdefault("torch_adam", True)
    return config


# ----------------------------------------------------------------------------- optimizer groups
def build_param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Trainable parameters in optimizer groups: decay (>= 2-D weights) / no decay (norms, biases), each split
    into its dense part and its MoE part per expert group (DeepSpeed's `moe: True` groups). Frozen parameters are
    left out, so they get no optimizer state. Empty groups are dropped."""
    decay, no_decay = [], []
    for param in model.parameters():
        if param.requires_grad:
            (decay if param.dim() >= 2 else no_decay).append(param)
    groups = [
        {"name": "decay", "params": decay, "weight_decay": weight_decay},
        {"name": "no_decay", "params": no_decay, "weight_decay": 0.0},
    ]
    return _moe_optimizer_groups(groups)


# ----------------------------------------------------------------------------- initialisation
@dataclass
class EngineSetup:
    engine: Any  # deepspeed.DeepSpeedEngine
    optimizer: Any
    lr_scheduler: Any
    layout: ExpertParallelLayout


def check_deepspeed_version() -> str:
    import deepspeed
    from packaging.version import Version

    version = Version(deepspeed.__version__.split("+")[0])
    low, high = (Version(v) for v in SUPPORTED_DEEPSPEED)
    if not low <= version < high:
        raise RuntimeError(
            f"deepspeed {deepspeed.__version__} is outside the tested range [{low}, {high}): the expert-parallel "
            "integration relies on engine internals (MoE detection, group helpers); re-run tests/distributed first"
        )
    return str(version)


def optimizer_param_groups(engine: Any) -> list[tuple[dict[str, Any], list[nn.Parameter]]]:
    """(optimizer group settings, the model parameters it trains) for each group of the engine's optimizer.

    ZeRO 1/2 and DeepSpeed's bf16 / mixed-precision optimizers hand the torch optimizer flat fp32 copies, so the
    model's parameters are read from their `bit16_groups` / `bf16_groups` / `fp16_groups`; a plain (ZeRO-0 fp32)
    optimizer holds them directly.
    """
    wrapper = engine.optimizer
    for attr in ("bit16_groups", "bf16_groups", "fp16_groups"):
        if hasattr(wrapper, attr):
            return list(zip(wrapper.optimizer.param_groups, getattr(wrapper, attr), strict=True))
    return [(group, list(group["params"])) for group in wrapper.param_groups]


def verify_moe_setup(engine: Any, model: nn.Module, layout: ExpertParallelLayout) -> None:
    """Fail loudly if DeepSpeed did not pick up our MoE setup (guards against internals changing)."""
    from deepspeed.moe.utils import is_moe_param

    problems = []
    if not engine.has_moe_layers:
        problems.append("engine.has_moe_layers is False (the DeepSpeedMoeMarker modules were not detected)")
    expert_ids = {id(p) for p in expert_parameters(model)}
    untagged = [n for n, p in model.named_parameters() if id(p) in expert_ids and not is_moe_param(p)]
    if untagged:
        problems.append(f"expert parameters not tagged as MoE parameters: {untagged[:3]}")
    trainable_experts = {id(p) for p in expert_parameters(model) if p.requires_grad}
    in_moe_groups = {id(p) for g, params in optimizer_param_groups(engine) if g.get("moe") for p in params}
    if trainable_experts and not trainable_experts <= in_moe_groups:
        problems.append("trainable expert parameters missing from the optimizer's MoE parameter groups")
    if layout.group_name not in engine.expert_data_parallel_group:
        problems.append(f"engine has no expert-data-parallel group {layout.group_name}")
    if problems:
        raise RuntimeError("DeepSpeed MoE setup check failed: " + "; ".join(problems))


def _moe_optimizer_groups(param_groups: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """`param_groups` with each group split into its dense part and its MoE part per expert group (DeepSpeed's
    `moe: True` groups); empty groups dropped."""
    from deepspeed.moe.utils import split_params_into_different_moe_groups_for_optimizer

    return [g for g in split_params_into_different_moe_groups_for_optimizer(param_groups) if g["params"]]


def initialize_engine(
    model: nn.Module,
    ds_config: dict[str, Any] | str | Path,
    layout: ExpertParallelLayout,
    *,
    param_groups: list[dict[str, Any]] | None = None,
    lr_schedule: LRSchedule | None = None,
) -> EngineSetup:
    """Build the DeepSpeed engine for a model whose experts are ready for it. Changes nothing in the model.

    Before: `prepare_expert_parallel` (which returned `layout`: process groups, experts sharded), LoRA if any,
    `tag_expert_parameters`, `install_moe_markers`, the stage's freezing, `enable_activation_checkpointing` if
    wanted (training/deepspeed_moe.py); every rank calls this with the same config. Here: check the DeepSpeed
    version, validate the config, split `param_groups` (default: decay / no-decay over the trainable parameters)
    into DeepSpeed's MoE groups, `deepspeed.initialize` with the stage's `lr_schedule` (a `StageLRScheduler`; None:
    whatever scheduler the config names, or a constant lr), then verify DeepSpeed registered the MoE setup.
    """
    import deepspeed

    check_deepspeed_version()
    config = load_deepspeed_config(ds_config)
    blocks = moe_blocks(model)
    validate_deepspeed_config(config, has_moe=bool(blocks))
    if bool(config.get("use_data_before_expert_parallelism", False)) != layout.use_data_before_expert_parallel:
        raise ValueError("DeepSpeed config use_data_before_expert_parallelism="
                         f"{config.get('use_data_before_expert_parallelism', False)} does not match the expert-"
                         f"parallel groups (created with use_data_before_expert_parallel="
                         f"{layout.use_data_before_expert_parallel} by prepare_expert_parallel)")
    if lr_schedule is not None and "scheduler" in config:
        raise ValueError(f"DeepSpeed config has a scheduler ({config['scheduler'].get('type')!r}) and an lr_schedule "
                         "was given: drop one of them")
    if blocks:
        check_ready_for_engine(model, layout)

    if param_groups is None:
        weight_decay = float(config.get("optimizer", {}).get("params", {}).get("weight_decay", 0.0))
        param_groups = build_param_groups(model, weight_decay)
    else:
        param_groups = _moe_optimizer_groups(param_groups)
    scheduler_factory = None if lr_schedule is None else functools.partial(StageLRScheduler, schedule=lr_schedule)
    engine, optimizer, _, lr_scheduler = deepspeed.initialize(
        model=model, model_parameters=param_groups, config=config, lr_scheduler=scheduler_factory)
    if blocks:
        verify_moe_setup(engine, model, layout)
        if engine.zero_optimization_stage() == 0 and not engine.bfloat16_enabled() and engine.gradient_clipping() > 0:
            # DeepSpeed's ZeRO-0 fp32 clip averages each rank's own norm; under EP ranks hold different experts, so
            # that is not the global norm. ZeRO 1/2 and the bf16 optimizer compute it correctly themselves.
            engine.clip_fp32_gradients = functools.partial(_clip_with_global_moe_norm, engine, layout.ep_group)
    return EngineSetup(engine=engine, optimizer=optimizer, lr_scheduler=lr_scheduler, layout=layout)


@torch.no_grad()
def _clip_with_global_moe_norm(engine: Any, ep_group: Any) -> torch.Tensor:
    """Clip the (already reduced) fp32 gradients by the global L2 norm: dense gradients are identical on every
    rank, expert gradients identical within an expert-data-parallel group and distinct across the EP group, so
    norm^2 = dense^2 + sum over the EP group of each rank's expert^2. Sets the engine's reported grad norm."""
    from deepspeed.moe.utils import is_moe_param

    dense_sq = torch.zeros((), dtype=torch.float32, device=_comm_device())
    expert_sq = torch.zeros_like(dense_sq)
    grads = []
    for param in engine.module.parameters():
        if param.grad is None:
            continue
        grads.append(param.grad)
        square = param.grad.detach().float().pow(2).sum().to(dense_sq.device)
        if is_moe_param(param):
            expert_sq += square
        else:
            dense_sq += square
    dist.all_reduce(expert_sq, group=ep_group)
    total = (dense_sq + expert_sq).sqrt()
    coefficient = (engine.gradient_clipping() / (total + 1e-6)).clamp(max=1.0)
    for grad in grads:
        grad.mul_(coefficient.to(grad.device, grad.dtype))
    engine._global_grad_norm = float(total)
    return total


def enable_activation_checkpointing(model: nn.Module) -> None:
    """Recompute each decoder layer in backward (non-reentrant checkpointing). Under EP the recomputation re-issues
    the layer's all-to-alls on every rank in the same order, so collectives stay matched."""
    if hasattr(model, "gradient_checkpointing_enable"):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    found = False
    for module in model.modules():
        if hasattr(module, "gradient_checkpointing"):
            module.gradient_checkpointing = True
            found = True
    if not found:
        raise ValueError(f"{type(model).__name__} has no module with a gradient_checkpointing switch")


# ----------------------------------------------------------------------------- NaN / inf guard
def all_ranks_finite(*tensors: torch.Tensor | None, group: Any = None) -> bool:
    """True when every given tensor is finite on EVERY rank of `group` (default: the world). One all-reduce (MIN)
    of a local flag, so all ranks get the same answer and take the same branch (a rank-local decision would leave
    the ranks issuing different collectives: a hang)."""
    local = all(bool(torch.isfinite(t.detach()).all()) for t in tensors if t is not None)
    if not dist.is_initialized():
        return local
    flag = torch.tensor([1.0 if local else 0.0], device=_comm_device())
    dist.all_reduce(flag, op=dist.ReduceOp.MIN, group=group)
    return bool(flag.item() > 0)


def _comm_device() -> torch.device:
    if dist.is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _local_grads_finite(model: nn.Module) -> bool:
    return all(bool(torch.isfinite(p.grad).all()) for p in model.parameters() if p.grad is not None)


STEPPED, ACCUMULATED, DROPPED, SKIPPED = "stepped", "accumulated", "dropped", "skipped"


def guarded_backward_step(engine: Any, loss: torch.Tensor) -> str:
    """`engine.backward(loss); engine.step()` unless some rank's loss is non-finite. Returns what happened, the same
    on every rank:

    STEPPED      the optimizer applied an update (a gradient accumulation boundary)
    ACCUMULATED  gradients accumulated, no boundary yet
    DROPPED      non-finite loss on some rank: every rank drops this micro-batch (no backward, no step; the engine's
                 counters do not move, so with gradient accumulation the window simply takes the next micro-batch)
    SKIPPED      non-finite gradients with a finite loss at a boundary: the optimizer step was skipped on every rank
                 and the window's gradients discarded. ZeRO 1/2 and the bf16 optimizer detect them in their
                 all-reduced grad norm (counted in `engine.skipped_steps`; validate_deepspeed_config forces the
                 check on); at ZeRO-0 fp32 we check the reduced gradients here, clear them and skip on every rank.
    """
    if not all_ranks_finite(loss):
        return DROPPED
    engine.backward(loss)
    boundary = engine.is_gradient_accumulation_boundary()
    check_grads = boundary and engine.zero_optimization_stage() == 0
    if check_grads and not all_ranks_finite(torch.tensor(1.0 if _local_grads_finite(engine.module) else float("nan"))):
        engine.zero_grad()
        return SKIPPED
    skipped_before = engine.skipped_steps
    engine.step()
    if not boundary:
        return ACCUMULATED
    return SKIPPED if engine.skipped_steps > skipped_before else STEPPED


__all__ = [
    "ACCUMULATED", "DROPPED", "SKIPPED", "STEPPED", "SUPPORTED_ZERO_STAGES", "EngineSetup", "all_ranks_finite",
    "build_deepspeed_config", "build_param_groups", "check_deepspeed_version", "enable_activation_checkpointing",
    "guarded_backward_step", "initialize_engine", "load_deepspeed_config", "optimizer_param_groups",
    "validate_deepspeed_config", "verify_moe_setup",
]
