"""The Qwen2-architecture decoder with modality-aware MoE feed-forward layers.

RMSNorm -> GQA attention (SDPA, Omni 3D RoPE, KV cache) -> RMSNorm -> FFN, where the FFN is a dense SwiGLU MLP or an
`OmniSparseMoeBlock` depending on `config.is_moe_layer(i)`. Parameter names follow transformers' Qwen2 / Qwen2-MoE
(`layers.N.self_attn.q_proj`, `layers.N.mlp.experts.gate_up_proj`, ...) so dense checkpoints map 1:1.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from .configuration_omni import OmniMoeConfig
from .moe import MoeRouterOutput, OmniSparseMoeBlock, SwiGLUMLP
from .rope import OmniRotaryEmbedding, apply_omni_rotary


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        return self.weight * x.to(dtype)


class OmniAttention(nn.Module):
    def __init__(self, config: OmniMoeConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.head_dim = config.head_dim
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.dropout = config.attention_dropout
        bias = config.attention_bias
        self.q_proj = nn.Linear(config.hidden_size, self.num_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(config.hidden_size, self.num_kv_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(config.hidden_size, self.num_kv_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, config.hidden_size, bias=False)

    def forward(self, x, cos, sin, attn_mask, is_causal: bool, cache=None) -> torch.Tensor:
        bsz, q_len, _ = x.shape
        q = self.q_proj(x).view(bsz, q_len, -1, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(bsz, q_len, -1, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(bsz, q_len, -1, self.head_dim).transpose(1, 2)
        q, k = apply_omni_rotary(q, k, cos, sin)
        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx)
        out = F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=attn_mask,
            is_causal=is_causal,
            dropout_p=self.dropout if self.training else 0.0,
            enable_gqa=self.num_kv_heads != self.num_heads,
        )
        return self.o_proj(out.transpose(1, 2).reshape(bsz, q_len, -1))


class OmniDecoderLayer(nn.Module):
    def __init__(self, config: OmniMoeConfig, layer_idx: int):
        super().__init__()
        self.is_moe = config.is_moe_layer(layer_idx)
        self.self_attn = OmniAttention(config, layer_idx)
        if self.is_moe:
            self.mlp = OmniSparseMoeBlock(config)
        else:
            self.mlp = SwiGLUMLP(config.hidden_size, config.intermediate_size, config.hidden_act)
        self.input_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def forward(self, x, cos, sin, attn_mask, is_causal, modality_ids, token_mask, cache=None):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, attn_mask, is_causal, cache)
        h = self.post_attention_layernorm(x)
        if self.is_moe:
            h, router_out = self.mlp(h, modality_ids, token_mask)
        else:
            h, router_out = self.mlp(h), None
        return x + h, router_out


def build_attention_mask(
    attention_mask: torch.Tensor | None, q_len: int, past_len: int, device: torch.device
) -> tuple[torch.Tensor | None, bool]:
    """Return (boolean SDPA mask [B, 1, q, k] or None, is_causal).

    A 4-D boolean mask (e.g. block-diagonal for packed sequences) is used as given. With no padding the fast paths
    are taken: `is_causal=True` for a prompt, no mask for a cached decode step of one token.
    """
    if attention_mask is not None and attention_mask.dim() == 4:
        return attention_mask.bool(), False
    no_padding = attention_mask is None or bool(attention_mask.all())
    if no_padding and past_len == 0:
        return None, True
    if no_padding and q_len == 1:
        return None, False
    k_len = past_len + q_len
    query_pos = torch.arange(past_len, k_len, device=device)
    mask = torch.arange(k_len, device=device)[None, :] <= query_pos[:, None]  # [q, k]
    mask = mask[None, None]
    if attention_mask is not None:
        mask = mask & attention_mask[:, None, None, :k_len].bool()
    # A left-padded query row can see no key at all; SDPA would return NaN there. Let it see every key: its output
    # is padding and never used, and no real token ever attends to it.
    mask = mask | ~mask.any(dim=-1, keepdim=True)
    return mask, False


class OmniMoeModel(nn.Module):
    """Embeddings, decoder layers and the final norm; takes embeddings (media already merged in)."""

    def __init__(self, config: OmniMoeConfig):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, config.pad_token_id)
        self.layers = nn.ModuleList(OmniDecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = OmniRotaryEmbedding(config.head_dim, config.rope_theta, config.mrope_section,
                                              config.mrope_interleaved)
        self.gradient_checkpointing = False

    def forward(
        self,
        inputs_embeds: torch.Tensor,
        modality_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        cache=None,
    ) -> tuple[torch.Tensor, list[MoeRouterOutput]]:
        bsz, q_len, _ = inputs_embeds.shape
        past_len = cache.get_seq_length() if cache is not None else 0
        if position_ids is None:
            position_ids = torch.arange(past_len, past_len + q_len, device=inputs_embeds.device).expand(bsz, -1)
        attn_mask, is_causal = build_attention_mask(attention_mask, q_len, past_len, inputs_embeds.device)
        token_mask = None
        if attention_mask is not None and attention_mask.dim() == 2:
            token_mask = attention_mask[:, -q_len:].bool()
        cos, sin = self.rotary_emb(inputs_embeds, position_ids)

        hidden = inputs_embeds
        router_outputs: list[MoeRouterOutput] = []
        for layer in self.layers:
            args = (hidden, cos, sin, attn_mask, is_causal, modality_ids, token_mask, cache)
            if self.gradient_checkpointing and self.training:
                hidden, router_out = checkpoint(layer, *args, use_reentrant=False)
            else:
                hidden, router_out = layer(*args)
            if router_out is not None:
                router_outputs.append(router_out)
        return self.norm(hidden), router_outputs
