"""The Qwen2-architecture decoder with modality-aware MoE feed-forward layers, as a transformers base model.

RMSNorm -> GQA attention (Omni 3D RoPE, KV cache) -> RMSNorm -> FFN, where the FFN is a dense SwiGLU MLP or an
`OmniSparseMoeBlock` depending on `config.is_moe_layer(i)`. Parameter names follow transformers' Qwen2 / Qwen2-MoE
(`layers.N.self_attn.q_proj`, `layers.N.mlp.experts.gate_up_proj`, ...) so dense checkpoints map 1:1.

The model keeps transformers' contract the way its Qwen2 does: the attention kernel comes from
`config._attn_implementation` (eager, sdpa, flex, flash, or a registered backend), masks from `create_causal_mask`
(padding, a given 4-D mask, and packed documents when position ids restart per document, as
`DataCollatorWithFlattening` makes), hidden states and attention maps are recorded by `capture_outputs`, and each
layer is a `GradientCheckpointingLayer` (so `gradient_checkpointing_enable(gradient_checkpointing_kwargs=...)`,
`use_reentrant` included, applies).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel
from transformers import initialization as init
from transformers.cache_utils import Cache, DynamicCache
from transformers.masking_utils import create_causal_mask
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.utils import ModelOutput
from transformers.utils.deprecation import deprecate_kwarg
from transformers.utils.generic import merge_with_config_defaults
from transformers.utils.output_capturing import OutputRecorder, capture_outputs

from .configuration_omni import OmniMoeConfig
from .experts import GroupedExperts, SwiGLUMLP
from .moe import OmniSparseMoeBlock
from .router import ModalityRouter, MoeRouterOutput
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


def eager_attention_forward(module, query, key, value, attention_mask, scaling: float, dropout: float = 0.0, **kwargs):
    """Plain softmax attention (the `eager` implementation); also returns the attention weights.

    `attention_mask` is additive (float, as `create_causal_mask` builds for eager) or boolean (True = may attend, as a
    4-D block mask from our collator).
    """
    groups = module.num_key_value_groups
    key = key.repeat_interleave(groups, dim=1)
    value = value.repeat_interleave(groups, dim=1)
    scores = torch.matmul(query, key.transpose(2, 3)) * scaling
    if attention_mask is not None:
        mask = attention_mask[:, :, :, : key.shape[-2]]
        if mask.dtype == torch.bool:
            scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
        else:
            scores = scores + mask
    weights = torch.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    weights = F.dropout(weights, p=dropout, training=module.training)
    return torch.matmul(weights, value).transpose(1, 2).contiguous(), weights


class OmniAttention(nn.Module):
    def __init__(self, config: OmniMoeConfig, layer_idx: int):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.head_dim = config.head_dim
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.num_key_value_groups = self.num_heads // self.num_kv_heads
        self.scaling = self.head_dim**-0.5
        self.attention_dropout = config.attention_dropout
        self.is_causal = True
        bias = config.attention_bias
        self.q_proj = nn.Linear(config.hidden_size, self.num_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(config.hidden_size, self.num_kv_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(config.hidden_size, self.num_kv_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, config.hidden_size, bias=False)

    def forward(self, hidden_states, position_embeddings, attention_mask, cache: Cache | None = None, **kwargs):
        input_shape = hidden_states.shape[:-1]
        hidden_shape = (*input_shape, -1, self.head_dim)
        q = self.q_proj(hidden_states).view(hidden_shape).transpose(1, 2)
        k = self.k_proj(hidden_states).view(hidden_shape).transpose(1, 2)
        v = self.v_proj(hidden_states).view(hidden_shape).transpose(1, 2)
        cos, sin = position_embeddings
        q, k = apply_omni_rotary(q, k, cos, sin)
        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx)
        attention = ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation, eager_attention_forward)
        out, weights = attention(
            self, q, k, v, attention_mask,
            dropout=self.attention_dropout if self.training else 0.0, scaling=self.scaling, **kwargs,
        )
        return self.o_proj(out.reshape(*input_shape, -1).contiguous()), weights


class OmniDecoderLayer(GradientCheckpointingLayer):
    """Returns `(hidden_states,)`, plus the MoE layer's router tensors (`MoeRouterOutput.to_tuple()`) in MoE layers:
    plain tensors, so that reentrant gradient checkpointing carries the aux losses' gradients too."""

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

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
        modality_ids: torch.Tensor | None = None,
        token_mask: torch.Tensor | None = None,
        cache: Cache | None = None,
        use_cache: bool | None = False,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, ...]:
        attn_out, _ = self.self_attn(
            self.input_layernorm(hidden_states), position_embeddings, attention_mask, cache=cache, **kwargs
        )
        hidden_states = hidden_states + attn_out
        h = self.post_attention_layernorm(hidden_states)
        if not self.is_moe:
            return (hidden_states + self.mlp(h),)
        h, router_out = self.mlp(h, modality_ids, token_mask)
        return (hidden_states + h, *router_out.to_tuple())


@dataclass
class OmniMoeModelOutput(ModelOutput):
    """The decoder's output: final-norm hidden states, the KV cache, the optional recorded hidden states and attention
    maps, and one `MoeRouterOutput` per MoE layer."""

    last_hidden_state: torch.Tensor | None = None
    cache: Cache | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None
    attentions: tuple[torch.Tensor, ...] | None = None
    router_outputs: tuple[MoeRouterOutput, ...] | None = None


class OmniMoePreTrainedModel(PreTrainedModel):
    config_class = OmniMoeConfig
    config: OmniMoeConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["OmniDecoderLayer"]
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_flex_attn = True
    _supports_attention_backend = True
    # the MoE layer has a static-shape dispatch for tracing (moe.py), so the forward compiles without graph breaks
    _can_compile_fullgraph = True
    _can_record_outputs = {
        "hidden_states": OutputRecorder(OmniDecoderLayer, index=0),
        "attentions": OutputRecorder(OmniAttention, index=1),
    }

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        std = self.config.initializer_range
        if getattr(module, "_omni_torch_default_init", False):
            # Projectors and connectors keep PyTorch's default init: N(0, 0.02) there kept a small model on the
            # synthetic tasks from learning shape (the encoders' init comment in modeling_omni.py).
            # Every module inside them carries the flag: transformers initialises children before their parent.
            if hasattr(module, "reset_parameters"):
                module.reset_parameters()
            return
        if isinstance(module, nn.Linear):
            init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            init.normal_(module.weight, mean=0.0, std=std)
            if module.padding_idx is not None:
                init.zeros_(module.weight[module.padding_idx])
        elif isinstance(module, RMSNorm):
            init.ones_(module.weight)
        elif isinstance(module, GroupedExperts):
            init.normal_(module.gate_up_proj, mean=0.0, std=std)
            init.normal_(module.down_proj, mean=0.0, std=std)
        elif isinstance(module, ModalityRouter):
            init.normal_(module.weight, mean=0.0, std=std)
            init.zeros_(module.e_score_correction_bias)
            if module.modality_bias is not None:
                init.zeros_(module.modality_bias)
            init.copy_(module.allowed, torch.tensor(module.allowed_rows, dtype=torch.bool))
        elif isinstance(module, OmniSparseMoeBlock):
            # a non-persistent buffer: left as uninitialised memory by meta-device loading, it made the per-pool
            # Switch loss (router_balance="pool") of every loaded model depend on the process's memory history
            init.copy_(module.pool_of_expert, module.pool_membership())
        elif isinstance(module, OmniRotaryEmbedding):
            fresh = OmniRotaryEmbedding(self.config.head_dim, self.config.rope_theta, self.config.mrope_section,
                                        self.config.mrope_interleaved)
            init.copy_(module.inv_freq, fresh.inv_freq)
            init.copy_(module.component_of_freq, fresh.component_of_freq)

    def modality_ids_from_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Placeholder ids are unique per modality, so modality ids follow from the tokens (0 = text)."""
        modality_ids = torch.zeros_like(input_ids)
        for name, token_id in self.placeholder_ids().items():
            if name in self.config.modalities:
                modality_ids = modality_ids.masked_fill(input_ids == token_id, self.config.modality_id(name))
        return modality_ids

    def placeholder_ids(self) -> dict[str, int]:
        ids = {
            "image": self.config.image_token_id,
            "video": self.config.video_token_id,
            "audio": self.config.audio_token_id,
        }
        return {k: v for k, v in ids.items() if v is not None}


def split_position_ids(position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(RoPE position ids, text position ids for mask building) from the accepted layouts.

    `[B, T]`: plain 1-D positions (both). `[3, B, T]`: our (t, h, w) ids; media tokens repeat or jump positions, so
    they say nothing about document boundaries (no text ids). `[4, B, T]`: a text row, then (t, h, w) -- the layout
    transformers' Qwen2-VL takes for packed multimodal rows. Text ids that restart mark packed documents.
    """
    if position_ids.dim() == 2:
        return position_ids, position_ids
    if position_ids.dim() == 3 and position_ids.shape[0] == 4:
        return position_ids[1:], position_ids[0]
    if position_ids.dim() == 3 and position_ids.shape[0] == 3:
        return position_ids, None
    raise ValueError(f"position_ids must be [B, T], [3, B, T] or [4, B, T], got {tuple(position_ids.shape)}")


class OmniMoeModel(OmniMoePreTrainedModel):
    """Embeddings, decoder layers and the final norm: the text decoder, taking token ids or embeddings.

    The media tower lives on `OmniMoeForCausalLM` (its weights are `media.*` there, beside `model.*`): this model gets
    media as embeddings already merged into `inputs_embeds`, with their `modality_ids`.
    """

    def __init__(self, config: OmniMoeConfig):
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, config.pad_token_id)
        self.layers = nn.ModuleList(OmniDecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = OmniRotaryEmbedding(config.head_dim, config.rope_theta, config.mrope_section,
                                              config.mrope_interleaved)
        self.gradient_checkpointing = False
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.embed_tokens = value

    @merge_with_config_defaults
    @capture_outputs
    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        modality_ids: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        **kwargs: Any,
    ) -> OmniMoeModelOutput:
        """`modality_ids` [B, T] default to what `input_ids` say (placeholder ids), and to text for `inputs_embeds`.
        `position_ids`: see `split_position_ids`; absent, plain positions after the cached ones."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids or inputs_embeds")
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        bsz, q_len = inputs_embeds.shape[:2]
        if modality_ids is None:
            modality_ids = (self.modality_ids_from_input_ids(input_ids) if input_ids is not None else
                            torch.zeros(bsz, q_len, dtype=torch.long, device=inputs_embeds.device))
        if use_cache and cache is None:
            cache = DynamicCache(config=self.config)
        if position_ids is None:
            past_len = cache.get_seq_length() if cache is not None else 0
            rope_ids = torch.arange(past_len, past_len + q_len, device=inputs_embeds.device).expand(bsz, -1)
            text_ids = None  # consecutive positions: no packed documents to find
        else:
            rope_ids, text_ids = split_position_ids(position_ids)

        token_mask = None
        if attention_mask is not None and attention_mask.dim() == 2:
            token_mask = attention_mask[:, -q_len:].bool()
        mask = create_causal_mask(
            config=self.config, inputs_embeds=inputs_embeds, attention_mask=attention_mask, cache=cache,
            position_ids=text_ids,
        )
        position_embeddings = self.rotary_emb(inputs_embeds, rope_ids)

        hidden = inputs_embeds
        router_outputs: list[MoeRouterOutput] = []
        for layer in self.layers:
            # text position ids reach the attention kernel: flash attention finds packed documents from them
            out = layer(
                hidden, attention_mask=mask, position_embeddings=position_embeddings, modality_ids=modality_ids,
                token_mask=token_mask, cache=cache, use_cache=use_cache, position_ids=text_ids, **kwargs,
            )
            hidden = out[0]
            if len(out) > 1:
                router_outputs.append(MoeRouterOutput(*out[1:]))
        return OmniMoeModelOutput(
            last_hidden_state=self.norm(hidden),
            cache=cache if use_cache else None,
            router_outputs=tuple(router_outputs) if router_outputs else None,
        )


__all__ = ["OmniAttention", "OmniDecoderLayer", "OmniMoeModel", "OmniMoeModelOutput", "OmniMoePreTrainedModel",
           "RMSNorm", "split_position_ids"]
