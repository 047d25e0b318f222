"""The routed experts' computation, the shared/dense SwiGLU FFN and the dispatcher seam of the MoE layer.

`GroupedExperts` holds every routed expert as fused 3-D weights and runs the rows of all experts in one grouped
GEMM (`grouped_mm`, where it works for the device and dtype) or one matmul per expert. The router and the sparse
block that sorts tokens by expert live in `router.py` and `moe.py`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers.activations import ACT2FN

EXPERT_IMPLEMENTATIONS = ("auto", "grouped_mm", "loop")


class SwiGLUMLP(nn.Module):
    """Dense gated FFN with the parameter names of transformers' `Qwen2MLP` (used as the shared expert)."""

    def __init__(self, hidden_size: int, intermediate_size: int, hidden_act: str = "silu"):
        super().__init__()
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)
        self.act_fn = ACT2FN[hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


# ----------------------------------------------------------------------------- grouped GEMM kernels
class _ContiguousGrad(torch.autograd.Function):
    """Identity whose backward makes the incoming gradient contiguous.

    `grouped_mm`'s CPU backward rejects zero-stride gradients (e.g. the expanded ones of `out.sum().backward()`).
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return grad.contiguous()


class _FusedSwiGLU(torch.autograd.Function):
    """silu(gate) * up on the fused [N, 2F] projection, saving only that input.

    Its backward writes d(gate) and d(up) straight into one [N, 2F] gradient; autograd's `chunk` would allocate
    both halves and then concatenate them (a full extra copy of the largest activation).
    """

    @staticmethod
    def forward(ctx, gate_up: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(gate_up)
        gate, up = gate_up.chunk(2, dim=-1)
        return F.silu(gate).mul_(up)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        (gate_up,) = ctx.saved_tensors
        gate, up = gate_up.chunk(2, dim=-1)
        grad_gate_up = torch.empty_like(gate_up)
        grad_gate, grad_up = grad_gate_up.chunk(2, dim=-1)
        torch.mul(F.silu(gate), grad, out=grad_up)
        torch.mul(grad, up, out=grad_gate)
        torch.ops.aten.silu_backward.grad_input(grad_gate, gate, grad_input=grad_gate)
        return grad_gate_up


def _grouped_mm_fn():
    return getattr(F, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)


_GROUPED_MM_WORKS: dict[tuple[str, torch.dtype], bool] = {}


def grouped_mm_works(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether `grouped_mm` runs forward and backward for this device and dtype (probed once, then cached).

    Support differs by torch version, device type, GPU generation and dtype; a tiny probe is the only reliable
    test. Probing costs one small op per (device, dtype) per process.
    """
    key = (str(device), dtype)
    if key not in _GROUPED_MM_WORKS:
        fn = _grouped_mm_fn()
        works = False
        if fn is not None and device.type != "meta":
            try:
                # fixed values, not randn: the probe must not advance the global RNG (resume reproducibility).
                # Identity saved-tensor hooks: the first forward may run inside activation checkpointing, whose
                # hooks would otherwise count the probe's tensors and find fewer in the recomputation
                # (CheckpointError); the innermost hooks are the ones applied.
                with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t):
                    a = torch.linspace(-1, 1, 128, device=device).view(8, 16).to(dtype).requires_grad_()
                    b = torch.linspace(1, -1, 512, device=device).view(2, 16, 16).to(dtype).requires_grad_()
                    offs = torch.tensor([3, 8], device=device, dtype=torch.int32)
                    ref = torch.cat([a[:3] @ b[0].detach(), a[3:] @ b[1].detach()])
                    out = fn(a, b, offs=offs)
                    out.backward(torch.ones_like(out))
                    works = bool(torch.allclose(out.detach().float(), ref.detach().float(), atol=0.1, rtol=0.05))
            except (RuntimeError, NotImplementedError, TypeError, ValueError):
                works = False
        _GROUPED_MM_WORKS[key] = works
    return _GROUPED_MM_WORKS[key]


def _grouped_linear(x: torch.Tensor, weight: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """Rows `offsets[g-1]:offsets[g]` of x times `weight[g].T`; weight is [G, out, in] (nn.Linear layout)."""
    out = _grouped_mm_fn()(x, weight.transpose(1, 2), offs=offsets)
    return _ContiguousGrad.apply(out) if out.requires_grad else out


def _looped_linear(x: torch.Tensor, weights: tuple[torch.Tensor, ...], counts: list[int]) -> torch.Tensor:
    """Fallback: one matmul per expert over its contiguous slice of rows (experts without rows are skipped)."""
    pieces = [F.linear(chunk, w) for chunk, w, n in zip(x.split(counts), weights, counts) if n]
    return torch.cat(pieces) if len(pieces) > 1 else pieces[0]


class GroupedExperts(nn.Module):
    """Routed SwiGLU experts stored as fused 3-D weights (transformers v5 MoE layout).

    `gate_up_proj [E, 2F, D]` (gate rows first, then up rows) and `down_proj [E, D, F]`. `num_experts` is the number
    of experts held here; `expert_offset` is the global id of local expert 0 (non-zero only under expert
    parallelism, where `training/` hands each rank a slice). `implementation`: "auto" (grouped_mm where it works
    for the device and dtype, else the loop), "grouped_mm" or "loop".
    """

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int, hidden_act: str = "silu"):
        super().__init__()
        self.num_experts = num_experts
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.expert_offset = 0
        self.implementation = "auto"
        self.gate_up_proj = nn.Parameter(torch.empty(num_experts, 2 * intermediate_size, hidden_size))
        self.down_proj = nn.Parameter(torch.empty(num_experts, hidden_size, intermediate_size))
        self.act_fn = ACT2FN[hidden_act]
        self.fused_swiglu = hidden_act in ("silu", "swish")
        # Standalone default; OmniSparseMoeBlock / the model's _init_weights re-initialise with the config's std.
        nn.init.normal_(self.gate_up_proj, std=0.02)
        nn.init.normal_(self.down_proj, std=0.02)

    def extra_repr(self) -> str:
        return (
            f"num_experts={self.num_experts}, expert_offset={self.expert_offset}, hidden_size={self.hidden_size}, "
            f"intermediate_size={self.intermediate_size}, implementation={self.implementation!r}"
        )

    def resolved_implementation(self, x: torch.Tensor) -> str:
        if self.implementation not in EXPERT_IMPLEMENTATIONS:
            raise ValueError(
                f"GroupedExperts.implementation must be one of {EXPERT_IMPLEMENTATIONS}, got {self.implementation!r}"
            )
        if self.implementation != "auto":
            return self.implementation
        return "grouped_mm" if grouped_mm_works(x.device, self.gate_up_proj.dtype) else "loop"

    def _gated(self, gate_up: torch.Tensor) -> torch.Tensor:
        if self.fused_swiglu:
            return _FusedSwiGLU.apply(gate_up)
        gate, up = gate_up.chunk(2, dim=-1)
        return self.act_fn(gate) * up

    def forward_gathered(self, x: torch.Tensor, expert_of_row: torch.Tensor) -> torch.Tensor:
        """x [N, D] rows in any order, expert_of_row [N] local expert ids -> [N, D]: static shapes (the traced path)."""
        x = x.to(self.gate_up_proj.dtype)
        gate_up = torch.bmm(self.gate_up_proj.index_select(0, expert_of_row), x.unsqueeze(-1)).squeeze(-1)
        hidden = self._gated(gate_up)
        return torch.bmm(self.down_proj.index_select(0, expert_of_row), hidden.unsqueeze(-1)).squeeze(-1)

    def forward(self, x_sorted: torch.Tensor, tokens_per_expert: torch.Tensor) -> torch.Tensor:
        """x_sorted [N, D]: rows grouped by local expert in increasing order; tokens_per_expert [E] (may hold
        zeros; N may be 0). Returns [N, D] in the weights' dtype."""
        if tokens_per_expert.shape != (self.num_experts,):
            raise ValueError(
                f"GroupedExperts: tokens_per_expert must have shape ({self.num_experts},), "
                f"got {tuple(tokens_per_expert.shape)}"
            )
        x = x_sorted.to(self.gate_up_proj.dtype)
        if x.shape[0] == 0:
            # grouped_mm may reject zero rows; return an empty result that still reaches every parameter, so
            # this rank's experts get (zero) gradients like everyone else's.
            anchor = x.sum() + self.gate_up_proj.sum() + self.down_proj.sum()
            return x.new_zeros(0, self.hidden_size) + anchor * 0
        if self.resolved_implementation(x) == "grouped_mm":
            # int32 offsets keep the whole path free of host syncs.
            offsets = torch.cumsum(tokens_per_expert, 0, dtype=torch.int32)
            hidden = self._gated(_grouped_linear(x, self.gate_up_proj, offsets))
            return _grouped_linear(hidden, self.down_proj, offsets)
        counts = tokens_per_expert.tolist()  # the loop needs host-side slice sizes: one sync
        hidden = self._gated(_looped_linear(x, self.gate_up_proj.unbind(0), counts))
        return _looped_linear(hidden, self.down_proj.unbind(0), counts)


class LocalDispatcher:
    """The dispatcher seam: single-device dispatch just runs the local experts.

    Expert parallelism (training/) swaps in an all-to-all dispatcher with the same call signature. A plain object,
    not an nn.Module, so it adds nothing to the state dict.
    """

    def __call__(self, x_sorted: torch.Tensor, tokens_per_expert: torch.Tensor, experts: GroupedExperts) -> torch.Tensor:
        return experts(x_sorted, tokens_per_expert)


__all__ = ["EXPERT_IMPLEMENTATIONS", "GroupedExperts", "LocalDispatcher", "SwiGLUMLP", "grouped_mm_works"]
