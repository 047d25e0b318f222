"""`OmniMoeForCausalLM`: encoders -> projectors -> modality-aware sparse-MoE decoder -> LM head.

The shape follows torchtune's early-fusion models: media are encoded and projected (`OmniMediaTower`), their embeddings
replace the placeholder tokens (`<|image|>`, `<|video|>`, `<|audio|>`) in the token embeddings, and every token carries a
modality id that selects its pool of experts in each MoE layer. Loss = cross-entropy on labelled tokens
+ `router_aux_loss_coef` x load balancing + `router_z_loss_coef` x z-loss (each also returned on its own).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers import initialization as init
from transformers.cache_utils import DynamicCache
from transformers.utils import ModelOutput

from .configuration_omni import OmniMoeConfig
from .decoder import OmniMoeModel, RMSNorm
from .media import OmniMediaTower
from .moe import GroupedExperts, ModalityRouter, MoeRouterOutput, OmniSparseMoeBlock
from .rope import OmniRotaryEmbedding

IGNORE_INDEX = -100
# std of a vision encoder's position embeddings when it is built from a config (trained from scratch). At 1.0 (PyTorch's
# nn.Embedding default) the position code dominated a fresh ViT's patch features, so the shape of a small object at
# an arbitrary sub-patch offset had to be learned separately at every position (tiny-omni, val: video shape 72 %); at
# 0.02 (CLIP's init) the features carried almost no position (video direction 66 %, image position after alignment
# 27 %); at 0.3 both were learned (video shape 94 %, direction 97 %): docs/performance.md, "Video shape".
FRESH_VISION_POSITION_STD = 0.3
MEDIA_INPUTS = ("pixel_values", "pixel_values_videos", "audio_features", "audio_chunk_counts", "audio_token_counts")


@dataclass
class OmniMoeCausalLMOutput(ModelOutput):
    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    cache: Any = None
    ce_loss: torch.Tensor | None = None
    aux_loss: torch.Tensor | None = None
    z_loss: torch.Tensor | None = None
    router_outputs: tuple[MoeRouterOutput, ...] | None = None


class OmniMoePreTrainedModel(PreTrainedModel):
    config_class = OmniMoeConfig
    config: OmniMoeConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["OmniDecoderLayer"]
    _supports_sdpa = True
    _can_compile_fullgraph = False

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        std = self.config.initializer_range
        if getattr(module, "_omni_torch_default_init", False):
            # Projectors and connectors keep PyTorch's default init (GUIDE §6: N(0, 0.02) there hurt learning).
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


class OmniMoeForCausalLM(OmniMoePreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: OmniMoeConfig):
        super().__init__(config)
        self.model = OmniMoeModel(config)
        self.media = OmniMediaTower(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        for name, child in self.media.named_children():
            if not isinstance(child, PreTrainedModel) and "encoder" not in name:
                for module in child.modules():
                    module._omni_torch_default_init = True
        self.post_init()
        # Encoders built from a config (not loaded) start from PyTorch's default init, not their library's
        # N(0, 0.02): measured on the synthetic tasks, GUIDE §6. The vision encoder's learned position embeddings are
        # the exception, drawn at FRESH_VISION_POSITION_STD: they set how much a fresh ViT's features say *where* a
        # patch is against *what* it holds (docs/performance.md, "Video shape"). Whisper's position embeddings are
        # fixed sinusoids and keep them. Under from_pretrained / meta-device construction transformers turns these
        # init calls into no-ops (loaded weights replace them).
        towers = ((self.media.vision_encoder, (nn.Linear, nn.Conv2d)),
                  (self.media.audio_encoder, (nn.Linear, nn.Conv1d)))
        for encoder, kinds in towers:
            for module in encoder.modules() if encoder is not None else ():
                if isinstance(module, kinds):
                    module.reset_parameters()
        if self.media.vision_encoder is not None:
            for module in self.media.vision_encoder.modules():
                if isinstance(module, nn.Embedding):
                    init.normal_(module.weight, mean=0.0, std=FRESH_VISION_POSITION_STD)

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.model.embed_tokens = value

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def set_output_embeddings(self, value: nn.Linear) -> None:
        self.lm_head = value

    @property
    def moe_blocks(self) -> list[OmniSparseMoeBlock]:
        return [layer.mlp for layer in self.model.layers if layer.is_moe]

    # ------------------------------------------------------------------ inputs
    def modality_ids_from_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Placeholder ids are unique per modality, so modality ids follow from the tokens (0 = text)."""
        modality_ids = torch.zeros_like(input_ids)
        for name, token_id in self._placeholder_ids().items():
            if name in self.config.modalities:
                modality_ids = modality_ids.masked_fill(input_ids == token_id, self.config.modality_id(name))
        return modality_ids

    def _placeholder_ids(self) -> dict[str, int]:
        ids = {
            "image": self.config.image_token_id,
            "video": self.config.video_token_id,
            "audio": self.config.audio_token_id,
        }
        return {k: v for k, v in ids.items() if v is not None}

    def embed_inputs(
        self,
        input_ids: torch.Tensor,
        pixel_values: torch.Tensor | None = None,
        pixel_values_videos: torch.Tensor | None = None,
        audio_features: torch.Tensor | None = None,
        audio_chunk_counts: torch.Tensor | None = None,
        audio_token_counts: torch.Tensor | None = None,
        run_every_tower: bool = False,
    ) -> torch.Tensor:
        """Token embeddings with every media placeholder replaced by its media embedding, in order.

        `run_every_tower`: a medium this batch lacks still goes through its tower, on one blank input whose
        output is added times zero -- the result is unchanged, but every batch builds the same autograd graph.
        Training sets it: distributed optimizers that reduce gradients as backward produces them (ZeRO-2
        buckets, DDP) need every rank to produce them in the same order, whatever media its batch holds."""
        embeds = self.model.embed_tokens(input_ids)
        media: dict[str, torch.Tensor] = {}
        blanks: list[torch.Tensor] = []
        if pixel_values is not None:
            media["image"] = self.media.embed_images(pixel_values.to(self.dtype)).flatten(0, 1)
        elif run_every_tower and self.media.vision_encoder is not None:
            size = self.config.vision_config.image_size
            blanks.append(self.media.embed_images(embeds.new_zeros(1, 3, size, size)))
        if pixel_values_videos is not None:
            media["video"] = self.media.embed_videos(pixel_values_videos.to(self.dtype)).flatten(0, 1)
        elif run_every_tower and self.media.vision_encoder is not None:
            size, frames = self.config.vision_config.image_size, max(1, int(self.config.video_temporal_pooling))
            blanks.append(self.media.embed_videos(embeds.new_zeros(1, frames, 3, size, size)))
        if audio_features is not None:
            if audio_chunk_counts is None or audio_token_counts is None:
                raise ValueError("audio_features need audio_chunk_counts and audio_token_counts (from the processor)")
            media["audio"] = self.media.embed_audios(
                audio_features.to(self.dtype), audio_chunk_counts, audio_token_counts
            )
        elif run_every_tower and self.media.audio_encoder is not None:
            audio = self.config.audio_config
            blank = embeds.new_zeros(1, audio.num_mel_bins, 2 * audio.max_source_positions)
            blanks.append(self.media.embed_audios(blank, [1], [1]))
        for blank in blanks:
            embeds = embeds + 0.0 * blank.sum()
        placeholder_ids = self._placeholder_ids()
        for name, rows in media.items():
            if name not in placeholder_ids:
                raise ValueError(f"{name} inputs given but config.{name}_token_id is not set")
            mask = input_ids == placeholder_ids[name]
            n_tokens = int(mask.sum())
            if n_tokens != rows.shape[0]:
                raise ValueError(
                    f"{n_tokens} {name} placeholder tokens in input_ids but the {name} inputs give {rows.shape[0]} "
                    f"embeddings: the processor and the model config disagree, or media and placeholders do not match"
                )
            embeds = embeds.masked_scatter(mask.unsqueeze(-1).expand_as(embeds), rows.to(embeds.dtype))
        for name, token_id in placeholder_ids.items():
            if name not in media and bool((input_ids == token_id).any()):
                raise ValueError(f"input_ids contain {name} placeholder tokens but no {name} inputs were given")
        return embeds

    def prepare_inputs_for_generation(self, input_ids, cache=None, **kwargs):
        inputs = super().prepare_inputs_for_generation(input_ids, cache=cache, **kwargs)
        if inputs.get("input_ids") is not None:
            inputs.pop("modality_ids", None)  # follows exactly from the ids, whatever their length this step
        if cache is not None and cache.get_seq_length() > 0:
            for key in MEDIA_INPUTS:  # decode steps: media were merged at prefill, new tokens are text
                inputs.pop(key, None)
        return inputs

    # ------------------------------------------------------------------ forward
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        modality_ids: torch.LongTensor | None = None,
        labels: torch.LongTensor | None = None,
        pixel_values: torch.Tensor | None = None,
        pixel_values_videos: torch.Tensor | None = None,
        audio_features: torch.Tensor | None = None,
        audio_chunk_counts: torch.Tensor | None = None,
        audio_token_counts: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        rope_deltas: torch.Tensor | None = None,
        cache: Any = None,
        past_key_values: Any = None,
        use_cache: bool | None = None,
        logits_to_keep: int = 0,
        return_dict: bool | None = None,
        run_every_tower: bool = False,
        **kwargs: Any,
    ) -> OmniMoeCausalLMOutput:
        cache = cache if cache is not None else past_key_values
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids or inputs_embeds")
        if inputs_embeds is None:
            inputs_embeds = self.embed_inputs(
                input_ids, pixel_values, pixel_values_videos, audio_features, audio_chunk_counts, audio_token_counts,
                run_every_tower=run_every_tower,
            )
        if modality_ids is None:
            if input_ids is None:
                raise ValueError("modality_ids are required when inputs_embeds are given")
            modality_ids = self.modality_ids_from_input_ids(input_ids)
        use_cache = use_cache if use_cache is not None else (self.config.use_cache and not self.training)
        if use_cache and cache is None:
            cache = DynamicCache(config=self.config)
        if position_ids is None and rope_deltas is not None:
            # continue a processed prompt: sequence index + (max prompt position + 1 - prompt length), on all 3 rows
            past = cache.get_seq_length() if cache is not None else 0
            steps = torch.arange(past, past + inputs_embeds.shape[1], device=inputs_embeds.device)
            position_ids = (steps[None, :] + rope_deltas.to(steps.device).view(-1, 1)).unsqueeze(0).expand(3, -1, -1)

        hidden, router_outputs = self.model(
            inputs_embeds, modality_ids, attention_mask=attention_mask, position_ids=position_ids, cache=cache
        )
        if logits_to_keep:
            hidden = hidden[:, -logits_to_keep:]
        logits = self.lm_head(hidden)

        ce_loss = aux_loss = z_loss = loss = None
        if router_outputs:
            aux_loss = torch.stack([r.aux_loss for r in router_outputs]).mean()
            z_loss = torch.stack([r.z_loss for r in router_outputs]).mean()
        if labels is not None:
            ce_loss = causal_lm_loss(logits, labels)
            loss = ce_loss
            if aux_loss is not None:
                loss = loss + self.config.router_aux_loss_coef * aux_loss + self.config.router_z_loss_coef * z_loss
        return OmniMoeCausalLMOutput(
            loss=loss,
            logits=logits,
            cache=cache if use_cache else None,
            ce_loss=ce_loss,
            aux_loss=aux_loss,
            z_loss=z_loss,
            router_outputs=tuple(router_outputs) if router_outputs else None,
        )


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy over labelled positions, in fp32; 0 (with a graph) when nothing is labelled."""
    shift_logits = logits[:, :-1].float().reshape(-1, logits.shape[-1])
    shift_labels = labels[:, 1:].reshape(-1).to(logits.device)
    summed = F.cross_entropy(shift_logits, shift_labels, ignore_index=IGNORE_INDEX, reduction="sum")
    count = (shift_labels != IGNORE_INDEX).sum().clamp(min=1)
    return summed / count


OmniMoeConfig.register_for_auto_class()
OmniMoeForCausalLM.register_for_auto_class("AutoModelForCausalLM")

__all__ = ["OmniMoeForCausalLM", "OmniMoePreTrainedModel", "OmniMoeCausalLMOutput", "causal_lm_loss"]
