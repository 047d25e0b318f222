"""The modality-aware sparse MoE layer.

One router (fp32 logits) scores every router column; a fixed mask `allowed[modality, column]` restricts each
token to its modality's intra-modality experts, the shared inter-modality pool and the null experts. Selection
is top-k (optionally dynamic top-p), dispatch is dropless: all (token, slot) pairs that hit experts with weights
are sorted by expert id once -- for every modality together -- and run through one grouped computation.

Router column layout (see `configuration_omni.py`): `[intra(m0) .. intra(mN) | inter | null]`; the first E columns
own weights (`GroupedExperts`), the last `num_null_experts` columns own none: a slot routed there does no compute
and contributes exactly zero, so with renormalised top-k weights it scales the token's MoE output down.

Parameter names follow transformers' `Qwen2MoeSparseMoeBlock` (`gate.weight`, `experts.gate_up_proj`,
`experts.down_proj`, `shared_expert.*`, `shared_expert_gate.weight`) so weights map 1:1.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F
from torch import nn
from transformers.activations import ACT2FN

from .configuration_omni import OmniMoeConfig

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


# ----------------------------------------------------------------------------- router
@dataclass
class MoeRouterOutput:
    """Losses and statistics of one MoE layer's routing (statistics detached; padding excluded everywhere).

    Statistics of the whole batch, not per-sample tensors: a plain record (like transformers' Cache objects), so
    generic output utilities that slice outputs by sample leave it alone. Registered with torch.export below, so
    an exported forward can return it.

    aux_loss: Switch load balancing within each modality's pool, averaged over the modalities whose real tokens have
        routed slots. `router_balance="modality"`: over all its allowed routed columns (intra + inter as one pool);
        "pool": within its intra pool and within the inter pool separately (averaged), so the split between the
        pools is left to the task loss. Uniform routing gives 1; collapse onto one expert approaches the pool size.
    z_loss: mean over real tokens of logsumexp(masked router logits)^2.
    tokens_per_expert [M, C]: kept slots per modality and router column (null columns included).
    prob_mass [M, C]: summed masked-softmax probability per modality and column.
    null_fraction: fraction of real tokens' kept slots that went to null experts.
    """

    aux_loss: torch.Tensor
    z_loss: torch.Tensor
    tokens_per_expert: torch.Tensor
    prob_mass: torch.Tensor
    null_fraction: torch.Tensor

    def to_tuple(self) -> tuple[torch.Tensor, ...]:
        """The fields in order (the decoder layer returns them as plain tensors; `MoeRouterOutput(*t)` rebuilds)."""
        return tuple(getattr(self, f.name) for f in fields(self))


torch.export.register_dataclass(MoeRouterOutput)


@dataclass
class RoutingDecision:
    """Per-token routing of one call: masked fp32 `logits` and `probs` [N, C]; chosen `columns` [N, k] (sorted by
    probability when top-p is on); fp32 `weights` [N, k] (0 for dropped slots, renormalised if norm_topk_prob);
    `kept` [N, k] bool, or None when top-p is off and every slot is kept."""

    logits: torch.Tensor
    probs: torch.Tensor
    columns: torch.Tensor
    weights: torch.Tensor
    kept: torch.Tensor | None


class ModalityRouter(nn.Module):
    """The router (`gate`): owns `weight [C, D]`, the `allowed [M, C]` mask and the aux-free selection bias.

    With one weight matrix, every modality's logits for the shared inter pool come from the same rows, so the
    majority modality's preference (text: most tokens) moves every modality's intra/inter split (measured:
    docs/performance.md, "Routing"). Two options decouple the modalities: `router_per_modality` gives each
    modality its own router, `weight [M * C, D]` (row m * C + c: modality m's logit for column c; MoIIE's design),
    and `router_modality_bias` adds a learned logit offset per (modality, column), `modality_bias [M, C]`, zero
    at init, so a modality's prior over its pools is learned from its own tokens.

    `allowed` is non-persistent (derived from the config); after meta-device construction the model's
    `_init_weights` must restore it from `allowed_rows` and zero `e_score_correction_bias` if it was not loaded.
    """

    def __init__(self, config: OmniMoeConfig):
        super().__init__()
        self.num_columns = config.num_router_columns
        self.num_modalities = config.num_modalities
        self.per_modality = config.router_per_modality
        rows = self.num_columns * (self.num_modalities if self.per_modality else 1)
        self.weight = nn.Parameter(torch.empty(rows, config.hidden_size))
        self.allowed_rows = tuple(tuple(row) for row in config.allowed_experts())
        self.register_buffer("allowed", torch.tensor(self.allowed_rows, dtype=torch.bool), persistent=False)
        self.register_buffer("e_score_correction_bias", torch.zeros(self.num_columns, dtype=torch.float32))
        self.modality_bias = (
            nn.Parameter(torch.zeros(config.num_modalities, self.num_columns)) if config.router_modality_bias else None
        )
        # a single pool (every modality may use every column) needs no masking work in the hot path
        self.masks_columns = not all(all(row) for row in self.allowed_rows)

    def _apply(self, fn, recurse=True):
        # Keep the aux-free bias in fp32 through .to(bf16) / .half(): its updates (rate ~1e-3) vanish in bf16.
        bias = self.e_score_correction_bias
        super()._apply(fn, recurse)
        moved = self.e_score_correction_bias
        if moved.is_floating_point() and moved.dtype != torch.float32:
            self.e_score_correction_bias = bias.to(device=moved.device, dtype=torch.float32)
        return self

    def forward(self, x: torch.Tensor, modality_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """x [N, D], modality_ids [N] -> (masked fp32 logits [N, C], allowed [N, C] or None if nothing is masked)."""
        # fp32 at least (float64 stays float64, so gradcheck and fp64 references see no rounding)
        dtype = torch.promote_types(x.dtype, torch.float32)
        logits = F.linear(x.to(dtype), self.weight.to(dtype))
        if self.per_modality:  # every token's logits under each modality's router, then its own modality's
            logits = logits.view(-1, self.num_modalities, self.num_columns)
            index = modality_ids.long().view(-1, 1, 1).expand(-1, 1, self.num_columns)
            logits = logits.gather(1, index).squeeze(1)
        if self.modality_bias is not None:
            logits = logits + self.modality_bias.to(dtype)[modality_ids]
        if not self.masks_columns:
            return logits, None
        allowed = self.allowed[modality_ids]
        return logits.masked_fill(~allowed, float("-inf")), allowed


# ----------------------------------------------------------------------------- the block
class OmniSparseMoeBlock(nn.Module):
    """Modality-aware sparse MoE FFN: router -> top-k/top-p -> one sort -> grouped experts -> weighted scatter-add,
    plus the sigmoid-gated shared expert. Returns `(output [B, T, D], MoeRouterOutput)`."""

    def __init__(self, config: OmniMoeConfig):
        super().__init__()
        self.num_experts = config.num_routed_experts
        self.num_columns = config.num_router_columns
        self.num_modalities = config.num_modalities
        self.top_k = config.num_experts_per_tok
        self.top_p = config.moe_top_p
        self.norm_topk_prob = config.norm_topk_prob
        self.aux_free_bias = config.aux_free_bias
        self.aux_free_bias_rate = config.aux_free_bias_rate
        self.has_null_experts = config.num_null_experts > 0
        # Disjoint groups of weighted columns that the aux-free bias balances among themselves: each intra pool
        # and the inter pool (their loads differ by design, so one global mean would push rare pools forever).
        pools = config.expert_pools()
        self.balance_groups = [(r.start, r.stop) for name, r in pools.items() if name != "null" and len(r)]
        self.router_balance = config.router_balance
        # [G, E] one-hot pool membership of the weighted experts, for the per-pool Switch loss. Non-persistent:
        # after meta-device construction (`from_pretrained`) the model's `_init_weights` must refill it.
        self.register_buffer("pool_of_expert", self.pool_membership(), persistent=False)

        self.gate = ModalityRouter(config)
        self.experts = GroupedExperts(
            self.num_experts, config.hidden_size, config.moe_intermediate_size, config.hidden_act
        )
        if config.num_shared_experts:
            self.shared_expert = SwiGLUMLP(config.hidden_size, config.shared_expert_intermediate_size, config.hidden_act)
            self.shared_expert_gate = nn.Linear(config.hidden_size, 1, bias=False)
        else:
            self.shared_expert = None
            self.shared_expert_gate = None
        self.dispatcher = LocalDispatcher()

        std = config.initializer_range
        for param in self.parameters():
            nn.init.normal_(param, mean=0.0, std=std)
        if self.gate.modality_bias is not None:
            nn.init.zeros_(self.gate.modality_bias)  # no prior at init: the upcycled model's routing is unchanged

    def pool_membership(self) -> torch.Tensor:
        """[G, E] bool: row g marks the weighted experts of balance group g (`balance_groups`)."""
        membership = torch.zeros(len(self.balance_groups), self.num_experts, dtype=torch.bool)
        for g, (start, stop) in enumerate(self.balance_groups):
            membership[g, start:stop] = True
        return membership

    # ------------------------------------------------------------------ routing
    def route(self, x: torch.Tensor, modality_ids: torch.Tensor) -> RoutingDecision:
        """Router decisions for flat tokens x [N, D] with modality_ids [N] (public for diagnostics and tests)."""
        logits, allowed = self.gate(x, modality_ids)
        probs = torch.softmax(logits, dim=-1)
        if self.aux_free_bias:
            # The bias picks WHICH experts (masked so it can never reach a disallowed column); weights stay unbiased.
            scores = probs + self.gate.e_score_correction_bias.to(probs.dtype)
            if allowed is not None:
                scores = scores.masked_fill(~allowed, float("-inf"))
            columns = torch.topk(scores, self.top_k, dim=-1).indices
            weights = probs.gather(1, columns)
        else:
            weights, columns = torch.topk(probs, self.top_k, dim=-1)
        kept = None
        if self.top_p is not None and self.top_k > 1:
            if self.aux_free_bias:  # top-p walks the picked experts in order of probability
                weights, order = weights.sort(dim=-1, descending=True)
                columns = columns.gather(1, order)
            # keep slot j while the mass of the slots before it is still short of p: the fewest that reach p
            mass_before = weights.cumsum(dim=-1) - weights
            kept = mass_before < self.top_p
            kept[:, 0] = True
            weights = weights * kept
        if self.norm_topk_prob:
            # null experts' weights stay in the denominator: picking one scales the token's output down
            weights = weights / weights.sum(dim=-1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)
        return RoutingDecision(logits=logits, probs=probs, columns=columns, weights=weights, kept=kept)

    def _routing_stats(
        self, decision: RoutingDecision, modality_ids: torch.Tensor, real_token: torch.Tensor | None
    ) -> MoeRouterOutput:
        """Losses and statistics, vectorised over modalities (scatter-adds into [M, C]).

        Padding is excluded with `where` rather than by multiplying with 0, so non-finite padding states cannot
        reach the loss values or the statistics.
        """
        M, C, E = self.num_modalities, self.num_columns, self.num_experts
        logits, probs, columns = decision.logits, decision.probs, decision.columns
        n_tokens, k = columns.shape
        if real_token is None:
            real_token = torch.ones(n_tokens, dtype=torch.bool, device=probs.device)
        real = real_token.to(probs.dtype)
        n_real = real.sum()

        lse = torch.logsumexp(logits, dim=-1)
        z_loss = torch.where(real_token, lse.square(), 0.0).sum() / n_real.clamp_min(1)

        prob_mass = probs.new_zeros(M, C).index_add_(0, modality_ids, torch.where(real_token[:, None], probs, 0.0))
        slot_weight = real[:, None].expand(n_tokens, k)
        if decision.kept is not None:
            slot_weight = slot_weight * decision.kept
        flat_cell = (modality_ids[:, None] * C + columns).reshape(-1)
        counts = probs.new_zeros(M * C).index_add_(0, flat_cell, slot_weight.reshape(-1)).view(M, C)

        # Switch loss per modality over its allowed weighted columns: pool_size * sum_e f_e * P_e with f (slot
        # share) and P (probability share) both normalised within the pool, so null traffic neither helps nor hurts.
        routed_allowed = self.gate.allowed[:, :E].to(probs.dtype)
        if self.router_balance == "pool":
            # one "pool" per (modality, allowed pool) pair: [M, G, E]; a pair without routed slots is left out
            groups = routed_allowed[:, None, :] * self.pool_of_expert.to(probs.dtype)[None]
        else:
            groups = routed_allowed[:, None, :]
        f = counts[:, None, :E] * groups
        f_total = f.sum(dim=2, keepdim=True)
        f = f / f_total.clamp_min(1)
        p = prob_mass[:, None, :E] * groups
        p = p / p.sum(dim=2, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)
        per_group = groups.sum(dim=2) * (f * p).sum(dim=2)
        # average over (modality, pool) pairs with routed slots here (a modality sent only to null experts has no
        # load), so each modality counts once in "modality" mode and each of its used pools once in "pool" mode
        present = f_total.squeeze(2) > 0
        aux_loss = (per_group * present).sum() / present.sum().clamp_min(1)

        null_fraction = counts[:, E:].sum() / counts.sum().clamp_min(1)
        return MoeRouterOutput(
            aux_loss=aux_loss,
            z_loss=z_loss,
            tokens_per_expert=counts,
            prob_mass=prob_mass.detach(),
            null_fraction=null_fraction,
        )

    # ------------------------------------------------------------------ forward
    def forward(
        self,
        hidden_states: torch.Tensor,
        modality_ids: torch.Tensor,
        token_mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, MoeRouterOutput]:
        if hidden_states.dim() != 3 or modality_ids.shape != hidden_states.shape[:2]:
            raise ValueError(
                f"OmniSparseMoeBlock: expected hidden_states [B, T, D] and modality_ids [B, T], got "
                f"{tuple(hidden_states.shape)} and {tuple(modality_ids.shape)}"
            )
        if token_mask is not None and token_mask.shape != modality_ids.shape:
            raise ValueError(
                f"OmniSparseMoeBlock: token_mask must be [B, T] = {tuple(modality_ids.shape)}, "
                f"got {tuple(token_mask.shape)}"
            )
        batch, seq, dim = hidden_states.shape
        x = hidden_states.reshape(-1, dim)
        modality_ids = modality_ids.reshape(-1).long()
        real_token = None if token_mask is None else token_mask.reshape(-1).bool()

        decision = self.route(x, modality_ids)
        columns, weights, kept = decision.columns, decision.weights, decision.kept
        stats = self._routing_stats(decision, modality_ids, real_token)

        if torch.compiler.is_compiling() and isinstance(self.dispatcher, LocalDispatcher):
            out = self._dispatch_traced(x, columns, weights, kept)
            return out.to(hidden_states.dtype).view(batch, seq, dim), stats

        # Dropless dispatch: one stable sort of the (token, slot) pairs that hit weighted experts.
        k = self.top_k
        flat_columns = columns.reshape(-1)
        if self.has_null_experts or kept is not None:
            computed = flat_columns < self.num_experts
            if kept is not None:
                computed &= kept.reshape(-1)
            slots = computed.nonzero().squeeze(1)  # host sync: the row count must be known to skip null slots
            expert_ids, order = flat_columns[slots].sort(stable=True)
            slots = slots[order]
        else:
            expert_ids, slots = flat_columns.sort(stable=True)
        token_of_row = slots // k
        tokens_per_expert = torch.bincount(expert_ids, minlength=self.num_experts)

        x_sorted = x.index_select(0, token_of_row)
        expert_out = self.dispatcher(x_sorted, tokens_per_expert, self.experts)
        acc_dtype = weights.dtype  # fp32, or fp64 for fp64 inputs
        weighted = expert_out.to(acc_dtype) * weights.reshape(-1).index_select(0, slots)[:, None]
        out = torch.zeros(x.shape[0], dim, device=x.device, dtype=acc_dtype).index_add_(0, token_of_row, weighted)

        out = self._add_shared(x, out)
        return out.to(hidden_states.dtype).view(batch, seq, dim), stats

    def _add_shared(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        if self.shared_expert is None:
            return out
        shared = torch.sigmoid(self.shared_expert_gate(x)) * self.shared_expert(x)
        return out + shared.to(out.dtype)

    def _dispatch_traced(
        self, x: torch.Tensor, columns: torch.Tensor, weights: torch.Tensor, kept: torch.Tensor | None
    ) -> torch.Tensor:
        """The dispatch under torch.compile / torch.export: the same result with static shapes and no host sync.

        The eager path sizes its rows by how many slots hit weighted experts (`nonzero`, `bincount`, `tolist`: data-
        dependent shapes that break a graph), and `grouped_mm`'s compile-time checks accept bf16 inputs only. Here
        every (token, slot) pair keeps its row: each row's expert weights are gathered and applied by a batched
        matmul, and slots routed to null experts (or dropped by top-p) are computed against expert 0 and weighted
        by exactly 0. The cost: those slots' FLOPs, and the gathered weights ([N * k, 2F, D] at once), fine for the
        small models this traces on CPU.
        """
        n_tokens, k = columns.shape
        flat_columns = columns.reshape(-1)
        computed = flat_columns < self.num_experts
        if kept is not None:
            computed = computed & kept.reshape(-1)
        expert_of_row = torch.where(computed, flat_columns, 0)
        token_of_row = torch.arange(n_tokens * k, device=x.device) // k
        expert_out = self.experts.forward_gathered(x.index_select(0, token_of_row), expert_of_row)
        row_weight = torch.where(computed, weights.reshape(-1), 0.0)
        weighted = expert_out.to(weights.dtype) * row_weight[:, None]
        out = torch.zeros(n_tokens, x.shape[1], device=x.device, dtype=weights.dtype).index_add_(
            0, token_of_row, weighted
        )
        return self._add_shared(x, out)

    # ------------------------------------------------------------------ aux-loss-free balancing
    @torch.no_grad()
    def update_aux_free_bias(self, tokens_per_expert: torch.Tensor) -> None:
        """DeepSeek-V3 bias update: bias += rate * sign(mean_load - load), within each pool of weighted experts
        (each intra pool, the inter pool). Null columns are left untouched. Accepts loads [C] or [M, C]."""
        load = tokens_per_expert.detach().float()
        if load.dim() == 2:
            load = load.sum(dim=0)
        if load.shape != (self.num_columns,):
            raise ValueError(
                f"update_aux_free_bias: expected loads of shape [{self.num_columns}] or "
                f"[{self.num_modalities}, {self.num_columns}], got {tuple(tokens_per_expert.shape)}"
            )
        bias = self.gate.e_score_correction_bias
        load = load.to(bias.device)
        for start, stop in self.balance_groups:
            group = load[start:stop]
            bias[start:stop] += self.aux_free_bias_rate * torch.sign(group.mean() - group)


__all__ = [
    "GroupedExperts",
    "LocalDispatcher",
    "ModalityRouter",
    "MoeRouterOutput",
    "OmniSparseMoeBlock",
    "RoutingDecision",
    "SwiGLUMLP",
    "grouped_mm_works",
]
