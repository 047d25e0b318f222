"""The MoE router (`ModalityRouter`, the block's `gate`) and the records of its decisions and statistics.

One router (fp32 logits) scores every router column; a fixed mask `allowed[modality, column]` restricts each token
to its modality's intra-modality experts, the shared inter-modality pool and the null experts (column layout:
`configuration_omni.py`). The selection from these logits (top-k / top-p) and the losses are in `moe.py`.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F
from torch import nn

from .configuration_omni import OmniMoeConfig


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


__all__ = ["ModalityRouter", "MoeRouterOutput", "RoutingDecision"]
