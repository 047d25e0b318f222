"""Projectors from encoder states to the LLM's embedding space, and the pooling that cuts media tokens.

`MLPProjector` maps each (pooled) encoder state to one LLM token (LLaVA's 2-layer MLP). `QFormerConnector`
turns any number of encoder states into a fixed number of tokens with learnable queries (BLIP-2 style).
Both keep PyTorch's default initialisation: measured on this project, N(0, 0.02) in encoders/projectors hurt.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from transformers.activations import ACT2FN


def pool_grid(x: torch.Tensor, grid: tuple[int, int], k: int) -> torch.Tensor:
    """k x k average pooling of a row-major patch grid: [N, h*w, D] -> [N, ceil(h/k)*ceil(w/k), D].

    Edge windows that run past the grid average only the patches they cover (no zero padding counted).
    """
    h, w = int(grid[0]), int(grid[1])
    if x.dim() != 3 or x.shape[1] != h * w:
        raise ValueError(f"pool_grid: expected [N, {h * w}, D] for grid {h}x{w}, got {tuple(x.shape)}")
    if k < 1:
        raise ValueError(f"pool_grid: k must be >= 1, got {k}")
    if k == 1:
        return x
    n, _, d = x.shape
    maps = x.transpose(1, 2).reshape(n, d, h, w)
    # ceil_mode with no padding makes PyTorch divide edge windows by the number of covered cells
    pooled = F.avg_pool2d(maps, kernel_size=k, stride=k, ceil_mode=True)
    return pooled.flatten(2).transpose(1, 2)


def pool_sequence(x: torch.Tensor, k: int) -> torch.Tensor:
    """Average every k consecutive states: [N, S, D] -> [N, ceil(S/k), D] (the last group may be shorter)."""
    if x.dim() != 3:
        raise ValueError(f"pool_sequence: expected [N, S, D], got {tuple(x.shape)}")
    if k < 1:
        raise ValueError(f"pool_sequence: k must be >= 1, got {k}")
    if k == 1:
        return x
    pooled = F.avg_pool1d(x.transpose(1, 2), kernel_size=k, stride=k, ceil_mode=True)
    return pooled.transpose(1, 2)


class MLPProjector(nn.Module):
    """linear_1 -> activation -> linear_2, applied to every token independently."""

    def __init__(self, in_dim: int, out_dim: int, hidden_act: str = "gelu"):
        super().__init__()
        self.linear_1 = nn.Linear(in_dim, out_dim)
        self.act = ACT2FN[hidden_act]
        self.linear_2 = nn.Linear(out_dim, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.linear_1.weight.dtype)
        return self.linear_2(self.act(self.linear_1(x)))


class _Attention(nn.Module):
    """Multi-head attention over SDPA; keys/values may come from another sequence (cross-attention)."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.q_proj = nn.Linear(dim, dim)
        self.k_proj = nn.Linear(dim, dim)
        self.v_proj = nn.Linear(dim, dim)
        self.o_proj = nn.Linear(dim, dim)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        n, s, d = x.shape
        return x.view(n, s, self.num_heads, d // self.num_heads).transpose(1, 2)

    def forward(self, queries: torch.Tensor, keys_values: torch.Tensor, attn_mask: torch.Tensor | None = None):
        q = self._heads(self.q_proj(queries))
        k, v = self._heads(self.k_proj(keys_values)), self._heads(self.v_proj(keys_values))
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
        n, _, s, _ = out.shape
        return self.o_proj(out.transpose(1, 2).reshape(n, s, -1))


class _QFormerLayer(nn.Module):
    def __init__(self, dim: int, num_heads: int, ffn_dim: int):
        super().__init__()
        self.self_norm = nn.LayerNorm(dim)
        self.self_attn = _Attention(dim, num_heads)
        self.cross_norm = nn.LayerNorm(dim)
        self.cross_attn = _Attention(dim, num_heads)
        self.ffn_norm = nn.LayerNorm(dim)
        self.ffn = nn.Sequential(nn.Linear(dim, ffn_dim), nn.GELU(), nn.Linear(ffn_dim, dim))

    def forward(self, queries, states, cross_mask, has_states):
        h = self.self_norm(queries)
        queries = queries + self.self_attn(h, h)
        cross = self.cross_attn(self.cross_norm(queries), states, cross_mask)
        if has_states is not None:
            # a sample whose states are all masked reads nothing (its attention row would be NaN otherwise)
            cross = cross * has_states
        queries = queries + cross
        return queries + self.ffn(self.ffn_norm(queries))


class QFormerConnector(nn.Module):
    """Learnable queries that read encoder states by cross-attention: [N, S, in_dim] -> [N, Q, out_dim].

    Pre-norm layers of self-attention over the queries, cross-attention to the linearly projected (and
    normalised) encoder states, and a GELU FFN of width `ffn_dim` (default 4 * out_dim); a final LayerNorm.
    """

    def __init__(
        self, in_dim: int, out_dim: int, num_queries: int, num_layers: int, num_heads: int, ffn_dim: int | None = None
    ):
        super().__init__()
        if out_dim % num_heads:
            raise ValueError(f"QFormerConnector: out_dim {out_dim} is not divisible by num_heads {num_heads}")
        if num_queries < 1 or num_layers < 1:
            raise ValueError(f"QFormerConnector: num_queries ({num_queries}) and num_layers ({num_layers}) must be >= 1")
        self.num_queries = num_queries
        # small init keeps the queries distinct without dominating the first LayerNorm (BLIP-2 uses std 0.02)
        self.queries = nn.Parameter(torch.randn(num_queries, out_dim) / math.sqrt(out_dim))
        self.input_proj = nn.Linear(in_dim, out_dim)
        self.input_norm = nn.LayerNorm(out_dim)
        ffn_dim = ffn_dim or 4 * out_dim
        self.layers = nn.ModuleList(_QFormerLayer(out_dim, num_heads, ffn_dim) for _ in range(num_layers))
        self.output_norm = nn.LayerNorm(out_dim)

    def forward(self, states: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """`mask` [N, S] bool: True for states to read (e.g. encoder frames of real audio, not padding)."""
        if states.dim() != 3:
            raise ValueError(f"QFormerConnector: expected states [N, S, D], got {tuple(states.shape)}")
        n, s, _ = states.shape
        states = self.input_norm(self.input_proj(states.to(self.input_proj.weight.dtype)))
        cross_mask = has_states = None
        if mask is not None:
            if mask.shape != (n, s):
                raise ValueError(f"QFormerConnector: mask must be [N, S] = {(n, s)}, got {tuple(mask.shape)}")
            mask = mask.to(device=states.device, dtype=torch.bool)
            has_any = mask.any(dim=1)
            # fully masked rows attend everywhere (finite), then their reads are zeroed in the layer
            mask = mask | ~has_any[:, None]
            cross_mask = mask[:, None, None, :]
            has_states = has_any.to(states.dtype)[:, None, None]
        queries = self.queries.unsqueeze(0).expand(n, -1, -1)
        for layer in self.layers:
            queries = layer(queries, states, cross_mask, has_states)
        return self.output_norm(queries)


__all__ = ["MLPProjector", "QFormerConnector", "pool_grid", "pool_sequence"]
