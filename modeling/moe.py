"""The modality-aware sparse MoE layer (`OmniSparseMoeBlock`).

The router (`router.py`) scores every router column; selection is top-k (optionally dynamic top-p), dispatch is
dropless: all (token, slot) pairs that hit experts with weights are sorted by expert id once -- for every modality
together -- and run through one grouped computation (`experts.py`).

Router column layout (see `configuration_omni.py`): `[intra(m0) .. intra(mN) | inter | null]`; the first E columns
own weights (`GroupedExperts`), the last `num_null_experts` columns own none: a slot routed there does no compute
and contributes exactly zero, so with renormalised top-k weights it scales the token's MoE output down.

Parameter names follow transformers' `Qwen2MoeSparseMoeBlock` (`gate.weight`, `experts.gate_up_proj`,
`experts.down_proj`, `shared_expert.*`, `shared_expert_gate.weight`) so weights map 1:1. The classes of
`experts.py` and `router.py` are importable from here too (the layer's public surface is this module).
"""

from __future__ import annotations

import torch
from torch import nn

from .configuration_omni import OmniMoeConfig
from .experts import GroupedExperts, LocalDispatcher, SwiGLUMLP, grouped_mm_works
from .router import ModalityRouter, MoeRouterOutput, RoutingDecision


# ----------------------------------------------------------------------------- the block
class OmniSparseMoeBlock(nn.Module):
    """Modality-aware sparse MoE FFN: router -> top-k/top-p -> one sort -> grouped experts -> weighted scatter-add,
    plus the sigmoid-gated shared experts (one MLP holding all `num_shared_experts` of them). Returns
    `(output [B, T, D], MoeRouterOutput)`."""

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
            # n shared experts as one MLP n times as wide (DeepSeek-MoE): the same sum, one GEMM per projection
            self.shared_expert = SwiGLUMLP(config.hidden_size, config.shared_mlp_intermediate_size, config.hidden_act)
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
