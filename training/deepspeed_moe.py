"""DeepSpeed's view of our experts: the expert-parallel process groups, sharding the experts over them, the MoE
parameter tags and the MoE markers. Each step is its own function; a caller runs them once, in this order, before
building the engine (`omni_moe.training.engine.initialize_engine`):

    prepare_expert_parallel   process group, EP / expert-data-parallel groups, experts sharded over the EP group
    (LoRA on the experts)     adapters then see this rank's experts
    tag_expert_parameters     every parameter inside the experts, adapters included
    install_moe_markers

DeepSpeed 0.19.8 turns on its MoE machinery (expert-parallel groups, expert gradient reduction over the
expert-data-parallel group, MoE-aware grad norms, MoE optimizer groups) only for modules that are
`deepspeed.moe.layer.MoE` instances and for parameters tagged `allreduce=False` / `group_name`. So each MoE block
gets a parameter-less `DeepSpeedMoeMarker` child and its expert parameters get the tags (docs/training.md,
"Expert parallelism and ZeRO").

Group timeouts: DeepSpeed creates its expert groups with `torch.distributed.new_group(ranks)`, which gives a group
torch's default timeout for the backend (torch 2.13: 10 min for NCCL, 30 min for gloo), not the world group's. So
`create_expert_parallel_groups` creates them itself, in DeepSpeed's topology and with the run's timeout, and registers
them under the names DeepSpeed looks them up by.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch.distributed as dist
from torch import nn

from .distributed import DEFAULT_TIMEOUT_S, init_distributed
from .expert_parallel import check_ep_size, grouped_experts, moe_blocks, shard_experts

MARKER_ATTR = "deepspeed_moe_marker"


def expert_group_name(ep_size: int) -> str:
    """DeepSpeed's name for the expert-parallel group family of this size (`deepspeed.moe.layer.MoE` uses it)."""
    return f"ep_size_{ep_size}"


# ----------------------------------------------------------------------------- process groups
@dataclass
class ExpertParallelLayout:
    """Where this rank sits: EP group (all-to-all), expert-data-parallel group (expert gradient reduction)."""

    ep_size: int
    ep_rank: int
    group_name: str
    ep_group: Any
    expert_data_parallel_group: Any
    expert_data_parallel_size: int
    use_data_before_expert_parallel: bool = False


def expert_parallel_ranks(
    world_size: int, ep_size: int, use_data_before_expert_parallel: bool = False
) -> tuple[list[list[int]], list[list[int]]]:
    """(EP groups, expert-data-parallel groups) as rank lists: DeepSpeed's own topology function (no tensor or
    pipeline parallelism). Default "E + D": EP groups are consecutive ranks ([0, 1], [2, 3] at EP=2, world 4),
    expert-data-parallel groups stride by ep_size ([0, 2], [1, 3]); "D + E" swaps the two."""
    from deepspeed.utils import groups

    check_ep_size(ep_size, ep_size, world_size)
    ep_groups, edp_groups = groups._get_expert_parallel_ranks(world_size, 1, ep_size, 1, use_data_before_expert_parallel)
    return [list(r) for r in ep_groups], [list(r) for r in edp_groups]


def create_expert_parallel_groups(
    ep_size: int, use_data_before_expert_parallel: bool = False, *, timeout_s: float = DEFAULT_TIMEOUT_S
) -> ExpertParallelLayout:
    """Create (once per process and EP size) the expert-parallel and expert-data-parallel groups for `ep_size`, each
    with `timeout_s`, and register them in DeepSpeed's group registry (`deepspeed.utils.groups`), where the engine
    and `deepspeed.moe` look them up by `expert_group_name(ep_size)`. Collective over the world: every rank calls
    it, and `torch.distributed.new_group` runs for every group on every rank in the same order. Groups that already
    exist under that name (an earlier call) are reused as they are."""
    from deepspeed.utils import groups

    if timeout_s <= 0:
        raise ValueError(f"create_expert_parallel_groups: timeout_s must be positive, got {timeout_s}")
    world, rank = dist.get_world_size(), dist.get_rank()
    name = expert_group_name(ep_size)
    ep_registry, edp_registry = groups._get_expert_parallel_group_dict(), groups._get_expert_data_parallel_group_dict()
    if name not in ep_registry and name not in edp_registry:
        timeout = timedelta(seconds=timeout_s)
        for ranks_of, group_of, rank_lists in zip(
            (groups._EXPERT_PARALLEL_GROUP_RANKS, groups._EXPERT_DATA_PARALLEL_GROUP_RANKS),
            (ep_registry, edp_registry),
            expert_parallel_ranks(world, ep_size, use_data_before_expert_parallel),
            strict=True,
        ):
            for ranks in rank_lists:
                group = dist.new_group(ranks, timeout=timeout)
                if rank in ranks:
                    group_of[name], ranks_of[name] = group, ranks
    elif name not in ep_registry or name not in edp_registry:
        raise RuntimeError(f"DeepSpeed's group registry holds only one of the two {name} groups; it was changed "
                           "outside create_expert_parallel_groups")
    return ExpertParallelLayout(
        ep_size=ep_size,
        ep_rank=groups._get_expert_parallel_rank(name),
        group_name=name,
        ep_group=groups._get_expert_parallel_group(name),
        expert_data_parallel_group=groups._get_expert_data_parallel_group(name),
        expert_data_parallel_size=groups._get_expert_data_parallel_world_size(name),
        use_data_before_expert_parallel=use_data_before_expert_parallel,
    )


def prepare_expert_parallel(
    model: nn.Module, ep_size: int = 1, *, use_data_before_expert_parallel: bool = False,
    timeout_s: float = DEFAULT_TIMEOUT_S,
) -> ExpertParallelLayout:
    """Join the process group (if needed), create the EP groups and shard the experts over them (installing the
    all-to-all dispatcher). Collective: every rank calls it once with the same full model, before anything wraps
    the experts (LoRA) or builds an optimizer. `timeout_s` bounds every collective of the process groups it creates
    (the world group too, when it creates that). A second call for the same layout changes nothing."""
    init_distributed(timeout_s=timeout_s)
    blocks = moe_blocks(model)
    if blocks:
        first = grouped_experts(blocks[0])
        num_experts = getattr(first, "num_global_experts", first.num_experts)
        check_ep_size(num_experts, ep_size, dist.get_world_size())
    elif ep_size != 1:
        raise ValueError(f"ep_size={ep_size} but the model has no MoE layers")
    layout = create_expert_parallel_groups(ep_size, use_data_before_expert_parallel, timeout_s=timeout_s)
    if blocks:
        shard_experts(model, layout.ep_group, layout.ep_rank, ep_size)
    return layout


# ----------------------------------------------------------------------------- parameters and markers
def expert_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Every parameter inside a MoE block's `experts` (also ones a wrapper such as LoRA added there)."""
    return [p for block in moe_blocks(model) for p in block.experts.parameters()]


def tag_expert_parameters(model: nn.Module, ep_size: int) -> int:
    """Mark expert parameters as DeepSpeed MoE parameters of group `ep_size_<N>` (frozen ones too: their initial
    broadcast must stay within the expert-data-parallel group). Call it after the last change to the parameters
    inside the experts (LoRA adapters there are expert parameters too: untagged, ZeRO-0 would average different
    experts' adapters across ranks), before `initialize_engine`. Returns the number of tagged parameters."""
    params = expert_parameters(model)
    for param in params:
        param.allreduce = False
        param.group_name = expert_group_name(ep_size)
    return len(params)


@functools.cache
def _make_marker_class() -> type[nn.Module]:
    from deepspeed.moe.layer import MoE

    class DeepSpeedMoeMarker(MoE):
        """Makes DeepSpeed's engine treat the model as an MoE model (`has_moe_layers`); computes nothing.

        `MoE.__init__` is skipped on purpose: it would build DeepSpeed's own gate and experts. The attributes set
        here are the ones the engine reads (`num_experts`, `ep_size`, `expert_group_name`, `num_local_experts`).
        `num_local_experts = 0`: DeepSpeed's per-expert checkpoint files stay empty; our experts are saved by us.
        """

        def __init__(self, num_experts: int, ep_size: int):
            nn.Module.__init__(self)
            self.num_experts = num_experts
            self.ep_size = ep_size
            self.expert_group_name = expert_group_name(ep_size)
            self.num_local_experts = 0
            self.use_residual = False
            self.enable_expert_tensor_parallelism = False

        def set_deepspeed_parallelism(self, use_data_before_expert_parallel_: bool = False) -> None:
            from deepspeed.utils import groups

            # The engine calls this on every module that has it; our groups were created before sharding.
            if self.expert_group_name not in groups._get_expert_parallel_group_dict():
                raise RuntimeError(
                    f"expert-parallel group {self.expert_group_name} missing: create it with prepare_expert_parallel"
                )

        def forward(self, *args: Any, **kwargs: Any) -> None:
            raise RuntimeError("DeepSpeedMoeMarker is a marker for DeepSpeed's engine, not a layer to call")

        def extra_repr(self) -> str:
            return f"num_experts={self.num_experts}, ep_size={self.ep_size}"

    return DeepSpeedMoeMarker


def install_moe_markers(model: nn.Module, ep_size: int) -> int:
    """Attach a marker to every MoE block (no parameters, no state-dict entries). Returns the number of blocks."""
    marker_class = _make_marker_class()
    blocks = moe_blocks(model)
    for block in blocks:
        experts = grouped_experts(block)
        num_global = getattr(experts, "num_global_experts", experts.num_experts)
        setattr(block, MARKER_ATTR, marker_class(num_global, ep_size))
    return len(blocks)


def check_ready_for_engine(model: nn.Module, layout: ExpertParallelLayout) -> None:
    """Raise a clear error naming the missing step unless every MoE block is sharded for `layout`, carries a marker
    for its EP size and every expert parameter is tagged for it."""
    from deepspeed.moe.utils import is_moe_param

    blocks = moe_blocks(model)
    for block in blocks:
        experts = grouped_experts(block)
        if getattr(experts, "ep_size", None) != layout.ep_size:
            raise RuntimeError(f"experts are not sharded for ep_size={layout.ep_size} (found "
                               f"{getattr(experts, 'ep_size', 'unsharded')}): call prepare_expert_parallel first")
        marker = getattr(block, MARKER_ATTR, None)
        if marker is None or marker.ep_size != layout.ep_size:
            raise RuntimeError(f"MoE block without a DeepSpeed MoE marker for ep_size={layout.ep_size}: call "
                               "install_moe_markers before initialize_engine")
    names = {id(p): n for n, p in model.named_parameters()}
    untagged = [names.get(id(p), "?") for p in expert_parameters(model)
                if not is_moe_param(p) or getattr(p, "group_name", None) != layout.group_name]
    if untagged:
        raise RuntimeError(f"expert parameters not tagged for {layout.group_name}: {untagged[:3]}; call "
                           "tag_expert_parameters after the last change inside the experts (LoRA), before "
                           "initialize_engine")


__all__ = [
    "MARKER_ATTR", "ExpertParallelLayout", "check_ready_for_engine", "create_expert_parallel_groups",
    "expert_group_name", "expert_parallel_ranks", "expert_parameters", "install_moe_markers",
    "prepare_expert_parallel", "tag_expert_parameters",
]
