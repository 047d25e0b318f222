"""Expert parallelism: split each MoE layer's routed experts over an expert-parallel (EP) group and move tokens with
all-to-all through the model's dispatcher seam. `modeling/` stays single-device; everything here is plain
torch.distributed (DeepSpeed's side -- process groups, MoE parameter tags, optimizer groups -- is in `engine.py`).

Placement (round-robin): global expert g lives on EP rank `g % ep_size` at local index `g // ep_size`, so local
expert j of rank r is global expert `j * ep_size + r`. The router's columns are laid out pool by pool
(`[intra(text) | intra(image) | ... | inter | null]`), so round-robin spreads every contiguous pool over all EP
ranks: an image-heavy batch does not land on one rank.

Token flow of `AllToAllDispatcher` (one MoE layer, every rank of the EP group):
  1. reorder this rank's rows from global-expert order to (destination rank, local expert) order;
  2. all_to_all the per-(rank, local expert) row counts (equal splits: ep_size x num_local ints each way);
  3. all_to_all the rows with unequal splits (autograd-aware: its backward is the reverse all_to_all);
  4. regroup the received rows by local expert, run the local experts (ALWAYS, even on zero rows: the
     GroupedExperts zero-row path keeps their parameters in the graph, so every rank's backward issues the same
     collectives -- a rank that skipped them would leave its peers waiting until the process-group timeout);
  5. undo step 4's order, all_to_all the results back, undo step 1's order.
"""

from __future__ import annotations

import re

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_nn
from torch import nn

from omni_moe.modeling.moe import GroupedExperts, LocalDispatcher, OmniSparseMoeBlock

# Expert tensors in a state dict: `...experts.gate_up_proj` / `...experts.down_proj` (also under a wrapper module
# inside `experts`, e.g. `experts.base_layer.gate_up_proj`). Their dim 0 is the expert index.
EXPERT_KEY_PATTERN = re.compile(r"(^|\.)experts\.(.+\.)?(gate_up_proj|down_proj)$")


# ----------------------------------------------------------------------------- placement
def check_ep_size(num_experts: int, ep_size: int, world_size: int | None = None) -> None:
    """Raise a clear error unless `ep_size` divides the routed expert count (and the world size, when given)."""
    if ep_size < 1:
        raise ValueError(f"expert parallel size must be >= 1, got {ep_size}")
    if num_experts % ep_size:
        raise ValueError(
            f"expert parallelism: num_routed_experts ({num_experts}) must be divisible by the expert-parallel size "
            f"({ep_size}); every EP rank holds the same number of experts"
        )
    if world_size is not None and world_size % ep_size:
        raise ValueError(
            f"expert parallelism: world size ({world_size}) must be a multiple of the expert-parallel size ({ep_size})"
        )


def global_expert_ids(num_experts: int, ep_rank: int, ep_size: int) -> list[int]:
    """Global ids of the experts EP rank `ep_rank` holds, in local order (round-robin placement)."""
    check_ep_size(num_experts, ep_size)
    if not 0 <= ep_rank < ep_size:
        raise ValueError(f"ep_rank {ep_rank} outside [0, {ep_size})")
    return list(range(ep_rank, num_experts, ep_size))


def expert_owner(global_id: int, ep_size: int) -> tuple[int, int]:
    """(EP rank, local index) that holds global expert `global_id`."""
    return global_id % ep_size, global_id // ep_size


def moe_blocks(model: nn.Module) -> list[OmniSparseMoeBlock]:
    """Every OmniSparseMoeBlock in `model`, in module order (also under wrappers such as peft or DeepSpeed)."""
    return [m for m in model.modules() if isinstance(m, OmniSparseMoeBlock)]


def grouped_experts(block: OmniSparseMoeBlock) -> GroupedExperts:
    """The block's `GroupedExperts` (also when a wrapper such as a LoRA layer sits at `block.experts`)."""
    if isinstance(block.experts, GroupedExperts):
        return block.experts
    found = [m for m in block.experts.modules() if isinstance(m, GroupedExperts)]
    if len(found) != 1:
        raise TypeError(
            f"expert parallelism expects one GroupedExperts in block.experts, found {len(found)} inside "
            f"{type(block.experts).__name__}"
        )
    return found[0]


# ----------------------------------------------------------------------------- the dispatcher
def _inverse_permutation(perm: torch.Tensor) -> torch.Tensor:
    inverse = torch.empty_like(perm)
    inverse[perm] = torch.arange(perm.numel(), device=perm.device)
    return inverse


def _rows_per_segment_order(segment_key: torch.Tensor, counts: torch.Tensor, n_rows: int) -> torch.Tensor:
    """Rows come in contiguous segments of `counts[i]` rows; return the stable permutation that sorts rows by the
    key of their segment (segment order inside equal keys and row order inside a segment are kept)."""
    row_key = torch.repeat_interleave(segment_key, counts, output_size=n_rows)
    return torch.argsort(row_key, stable=True)


class AllToAllDispatcher:
    """Dispatcher seam for expert parallelism (same call signature as `LocalDispatcher`).

    `dispatcher(x_sorted [N, D], tokens_per_expert [E_global] long, experts) -> [N, D]`, rows of `x_sorted` grouped
    by global expert id ascending; `experts` holds this rank's `E_global / ep_size` experts (round-robin placement).
    A plain object, not an nn.Module: it adds nothing to the state dict. Every rank of `group` must call it the same
    number of times in the same order (once per MoE layer per forward), whatever its token counts.
    """

    def __init__(self, group: dist.ProcessGroup | None, ep_size: int):
        self.group = group
        self.ep_size = ep_size

    def __repr__(self) -> str:
        return f"AllToAllDispatcher(ep_size={self.ep_size})"

    def __call__(
        self, x_sorted: torch.Tensor, tokens_per_expert: torch.Tensor, experts: GroupedExperts
    ) -> torch.Tensor:
        ep = self.ep_size
        num_global = tokens_per_expert.numel()
        num_local = num_global // ep
        held = getattr(experts, "num_experts", num_local)  # a wrapper (LoRA) may not expose it
        if num_local * ep != num_global or held != num_local:
            raise ValueError(
                f"AllToAllDispatcher: {num_global} global experts over ep_size {ep} gives {num_global / ep} local "
                f"experts, but this rank's experts module holds {held}"
            )
        n_rows, hidden = x_sorted.shape
        device = x_sorted.device
        counts = tokens_per_expert.to(device=device, dtype=torch.long)

        # 1. global-expert order -> (destination rank, local expert) order. Global g = j * ep + r, so viewing the
        #    counts as [num_local, ep] and transposing gives send_counts[r, j].
        send_counts = counts.view(num_local, ep).t().contiguous()
        global_ids = torch.arange(num_global, device=device)
        send_order = _rows_per_segment_order((global_ids % ep) * num_local + global_ids // ep, counts, n_rows)
        x_send = x_sorted.index_select(0, send_order)

        # 2. counts: recv_counts[s, j] = rows source rank s sends for my local expert j
        recv_counts = torch.empty_like(send_counts)
        dist.all_to_all_single(recv_counts, send_counts, group=self.group)
        splits = torch.stack([send_counts.sum(1), recv_counts.sum(1)]).tolist()  # one host sync for both
        send_splits, recv_splits = splits[0], splits[1]

        # 3. payload (autograd-aware: backward sends the gradients the reverse way)
        x_recv = dist_nn.all_to_all_single(
            x_send.new_empty(sum(recv_splits), hidden), x_send, recv_splits, send_splits, group=self.group
        )

        # 4. (source rank, local expert) order -> local expert order; run every local expert, even on zero rows
        block_ids = torch.arange(ep * num_local, device=device).view(ep, num_local)
        src_of_block, local_of_block = block_ids // num_local, block_ids % num_local
        regroup = _rows_per_segment_order(
            (local_of_block * ep + src_of_block).reshape(-1), recv_counts.reshape(-1), x_recv.shape[0]
        )
        y_local = experts(x_recv.index_select(0, regroup), recv_counts.sum(0))

        # 5. back to (source rank, local expert) order, return the rows, restore the caller's order
        y_recv = y_local.index_select(0, _inverse_permutation(regroup))
        y_back = dist_nn.all_to_all_single(
            y_recv.new_empty(n_rows, hidden), y_recv, send_splits, recv_splits, group=self.group
        )
        return y_back.index_select(0, _inverse_permutation(send_order))


# ----------------------------------------------------------------------------- sharding
def shard_experts(
    model: nn.Module, ep_group: dist.ProcessGroup | None, ep_rank: int, ep_size: int
) -> list[OmniSparseMoeBlock]:
    """Keep only this EP rank's experts in every MoE block and install the all-to-all dispatcher.

    Each `GroupedExperts` gets new `nn.Parameter`s holding its slice (rows `ep_rank::ep_size` of the full tensors,
    `requires_grad` kept), `num_experts` = local count, `global_ids` (local -> global id), `ep_rank`, `ep_size` and
    `expert_offset = ep_rank` (the global id of local expert 0). With `ep_size == 1` nothing moves (the
    `LocalDispatcher` stays) and only the bookkeeping attributes are set. Call it before building an optimizer and
    before wrapping the experts (LoRA: its adapters then get this rank's expert count). Idempotent for the same
    (ep_rank, ep_size). Returns the blocks.
    """
    blocks = moe_blocks(model)
    for block in blocks:
        experts = grouped_experts(block)
        if hasattr(experts, "global_ids"):
            if experts.ep_size == ep_size and experts.ep_rank == ep_rank:
                continue
            raise RuntimeError(
                f"experts are already sharded for ep_size={experts.ep_size}, ep_rank={experts.ep_rank}; cannot "
                f"re-shard to ep_size={ep_size}, ep_rank={ep_rank} in place (gather_full_expert_state, then load the "
                "full state into an unsharded model)"
            )
        num_global = experts.num_experts
        ids = global_expert_ids(num_global, ep_rank, ep_size)
        if ep_size > 1:
            for name in ("gate_up_proj", "down_proj"):
                full = getattr(experts, name)
                local = nn.Parameter(full.detach()[ep_rank::ep_size].clone(), requires_grad=full.requires_grad)
                setattr(experts, name, local)
            experts.num_experts = len(ids)
            block.dispatcher = AllToAllDispatcher(ep_group, ep_size)
        experts.global_ids = tuple(ids)
        experts.num_global_experts = num_global
        experts.ep_rank = ep_rank
        experts.ep_size = ep_size
        experts.expert_offset = ep_rank
    return blocks


def unshard_dispatch(model: nn.Module) -> None:
    """Put `LocalDispatcher` back on every block (for a model whose experts are complete again, e.g. after loading
    a gathered full state into a fresh model)."""
    for block in moe_blocks(model):
        block.dispatcher = LocalDispatcher()


def is_expert_key(key: str) -> bool:
    return EXPERT_KEY_PATTERN.search(key) is not None


def local_expert_state(full: dict[str, torch.Tensor], ep_rank: int, ep_size: int) -> dict[str, torch.Tensor]:
    """Slice a full (EP=1 layout) state dict for one EP rank: expert tensors (keys matching `EXPERT_KEY_PATTERN`,
    dim 0 = global expert id) become rows `ep_rank::ep_size` in local order; every other entry is passed through."""
    out: dict[str, torch.Tensor] = {}
    for key, value in full.items():
        if is_expert_key(key):
            check_ep_size(value.shape[0], ep_size)
            out[key] = value[ep_rank::ep_size].clone()
        else:
            out[key] = value
    return out


@torch.no_grad()
def gather_full_expert_state(
    model: nn.Module, ep_group: dist.ProcessGroup | None = None, prefix: str = ""
) -> dict[str, torch.Tensor]:
    """Full (EP=1 layout, global expert order) expert tensors of every MoE block, keyed like `model.state_dict()`.

    Collective over the EP group: every EP rank must call it; every rank gets the full tensors (CPU copies). An
    unsharded model (or ep_size 1) just returns copies of its own tensors. `ep_group` defaults to the group the
    blocks' dispatchers use.
    """
    block_names = {id(m): name for name, m in model.named_modules()}
    out: dict[str, torch.Tensor] = {}
    for block in moe_blocks(model):
        experts = grouped_experts(block)
        ep_size = getattr(experts, "ep_size", 1)
        group = ep_group if ep_group is not None else getattr(block.dispatcher, "group", None)
        base = f"{prefix}{block_names[id(block)]}.experts."
        for name in ("gate_up_proj", "down_proj"):
            local = getattr(experts, name).detach().contiguous()
            if ep_size == 1:
                out[base + name] = local.cpu().clone()
                continue
            pieces = [torch.empty_like(local) for _ in range(ep_size)]
            dist.all_gather(pieces, local, group=group)
            # pieces[r][j] is global expert j * ep + r: interleave along a new dim 1, then flatten
            out[base + name] = torch.stack(pieces, dim=1).flatten(0, 1).cpu()
    return out


__all__ = [
    "EXPERT_KEY_PATTERN",
    "AllToAllDispatcher",
    "check_ep_size",
    "expert_owner",
    "gather_full_expert_state",
    "global_expert_ids",
    "grouped_experts",
    "is_expert_key",
    "local_expert_state",
    "moe_blocks",
    "shard_experts",
    "unshard_dispatch",
]
