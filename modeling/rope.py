"""Omni 3D rotary position embedding (M-RoPE with time, height and width components).

Each token carries three position ids (t, h, w). `config.mrope_section` says how many of the head dimension's rotary
frequency pairs each component drives (e.g. 4/6/6 of 16 pairs), and `config.mrope_interleaved` how they are laid out:

- interleaved (the default, Qwen3-VL's layout): pairs are dealt t, h, w, t, h, w, ... from the highest frequency
  down (a component whose count is used up drops out), so every axis gets fast and slow frequencies;
- sectioned (Qwen2-VL's layout): contiguous blocks, t on the highest frequencies, then h, then w on the lowest.
  With a small head dimension the width axis is then left only near-zero frequencies: at head_dim 32, rope_theta
  1e4, neighbouring image columns differ by <= 0.003 rad, so attention cannot tell left from right (measured on
  the tiny recipe: left/right at chance, top/bottom perfect).

Text tokens carry the same id on all three rows, so either layout is exactly 1-D RoPE on text.
How the ids are assigned to image, video and audio tokens lives in `positions.py`.
"""

from __future__ import annotations

import torch
from torch import nn


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_omni_rotary(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """q/k: [B, heads, T, head_dim]; cos/sin: [B, T, head_dim]."""
    cos = cos.unsqueeze(1)
    sin = sin.unsqueeze(1)
    return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin


def frequency_components(mrope_section: list[int], interleaved: bool) -> list[int]:
    """For each rotary frequency pair (highest frequency first), the position row (0 = t, 1 = h, 2 = w) driving it."""
    if not interleaved:
        return [c for c, n in enumerate(mrope_section) for _ in range(n)]
    left, components = list(mrope_section), []
    while any(left):
        for c in range(len(left)):
            if left[c]:
                components.append(c)
                left[c] -= 1
    return components


class OmniRotaryEmbedding(nn.Module):
    def __init__(self, head_dim: int, rope_theta: float, mrope_section: list[int], interleaved: bool = True):
        super().__init__()
        if sum(mrope_section) != head_dim // 2:
            raise ValueError(f"mrope_section {mrope_section} must sum to head_dim // 2 = {head_dim // 2}")
        inv_freq = 1.0 / (rope_theta ** (torch.arange(0, head_dim, 2, dtype=torch.float) / head_dim))
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        # component_of_freq[j] in {0, 1, 2}: which position row (t, h, w) drives frequency pair j
        component = torch.tensor(frequency_components(list(mrope_section), interleaved))
        self.register_buffer("component_of_freq", component, persistent=False)

    def _apply(self, fn, recurse: bool = True):
        """`module.to(torch.bfloat16)` casts every floating buffer; the frequencies stay fp32 (moved, not rounded).
        In bf16 an angle position x inv_freq is off by up to 4.7 rad at position 4095 (measured for Qwen2.5's
        theta 1e6 and head_dim 128), so a bf16 model would train and generate with wrong rotations."""
        exact = self.inv_freq
        super()._apply(fn, recurse)
        if self.inv_freq.dtype != torch.float32 and exact.dtype == torch.float32 and not exact.is_meta:
            self.inv_freq = exact.to(self.inv_freq.device)
        return self

    @torch.no_grad()
    def forward(self, x: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """position_ids: [3, B, T] (or [B, T] for plain 1-D positions). Returns cos, sin: [B, T, head_dim] in x.dtype."""
        if position_ids.dim() == 2:
            position_ids = position_ids.unsqueeze(0).expand(3, -1, -1)
        inv_freq = self.inv_freq.to(device=x.device, dtype=torch.float)
        # [3, B, T, half] angles for every component, then each frequency pair picks its own component's angle
        angles = position_ids.to(device=x.device, dtype=torch.float).unsqueeze(-1) * inv_freq
        index = self.component_of_freq.to(x.device).view(1, 1, 1, -1).expand(1, *angles.shape[1:])
        freqs = angles.gather(0, index).squeeze(0)
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(x.dtype), emb.sin().to(x.dtype)
