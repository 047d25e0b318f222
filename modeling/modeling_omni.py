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
from transformers.modeling_utils import slice_logits_to_keep
from transformers.utils import ModelOutput
from transformers.utils.deprecation import deprecate_kwarg
from transformers.utils.generic import can_return_tuple

from .configuration_omni import OmniMoeConfig
from .decoder import OmniMoeModel, OmniMoePreTrainedModel
from .media import OmniMediaTower
from .moe import OmniSparseMoeBlock
from .router import MoeRouterOutput

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
    hidden_states: tuple[torch.Tensor, ...] | None = None
    attentions: tuple[torch.Tensor, ...] | None = None
    ce_loss: torch.Tensor | None = None
    aux_loss: torch.Tensor | None = None
    z_loss: torch.Tensor | None = None
    router_outputs: tuple[MoeRouterOutput, ...] | None = None
    # the vision tower's own output (hidden states; attentions if asked), when hidden states or attentions are asked
    image_outputs: ModelOutput | None = None


class OmniMoeForCausalLM(OmniMoePreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}
    # forward honours the Trainer's loss kwargs (`num_items_in_batch`, `shift_labels`): under gradient accumulation
    # the Trainer then leaves the loss undivided, so the loss must be normalised by the whole batch's label count
    accepts_loss_kwargs = True

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
        # N(0, 0.02): measured on the synthetic tasks with a small dense model, N(0, 0.02) in the encoders and
        # projectors kept shape from ever being learned once a second question used the same image (a linear probe
        # read shape off those encoders at 97 %), where PyTorch's default init learned every task. The vision
        # encoder's learned position embeddings are the exception, drawn at FRESH_VISION_POSITION_STD: they set how
        # much a fresh ViT's features say *where* a patch is against *what* it holds (docs/performance.md, "Video
        # shape"). Whisper's position embeddings are fixed sinusoids and keep them. Under from_pretrained / meta-device construction transformers turns these
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

    def save_pretrained(self, save_directory, *args, **kwargs):
        # transformers writes `auto_map` only for the class being saved; name the base model too, so that
        # AutoModel.from_pretrained(folder, trust_remote_code=True) gives the decoder (feature extraction)
        self.config.auto_map = {**(getattr(self.config, "auto_map", None) or {}),
                                "AutoModel": f"{OmniMoeModel.__module__.split('.')[-1]}.{OmniMoeModel.__name__}"}
        return super().save_pretrained(save_directory, *args, **kwargs)

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
    def embed_inputs(
        self,
        input_ids: torch.Tensor | None,
        pixel_values: torch.Tensor | None = None,
        pixel_values_videos: torch.Tensor | None = None,
        audio_features: torch.Tensor | None = None,
        audio_chunk_counts: torch.Tensor | None = None,
        audio_token_counts: torch.Tensor | None = None,
        run_every_tower: bool = False,
        inputs_embeds: torch.Tensor | None = None,
        encoder_outputs: dict[str, Any] | None = None,
    ) -> torch.Tensor:
        """Token embeddings with every media placeholder replaced by its media embedding, in order.

        Given `inputs_embeds` (with `input_ids=None`), the media go into those: placeholders are the rows equal to
        the placeholder token's embedding (`placeholder_masks`). `encoder_outputs`: a dict that receives the vision
        tower's own output under "image" (its hidden states; attentions if `encoder_outputs["output_attentions"]`).

        `run_every_tower`: a medium this batch lacks still goes through its tower, on one blank input whose
        output is added times zero -- the result is unchanged, but every batch builds the same autograd graph.
        Training sets it: distributed optimizers that reduce gradients as backward produces them (ZeRO-2
        buckets, DDP) need every rank to produce them in the same order, whatever media its batch holds."""
        embeds = self.model.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        media: dict[str, torch.Tensor] = {}
        blanks: list[torch.Tensor] = []
        if pixel_values is not None and encoder_outputs is not None:
            images, encoder_outputs["image"] = self.media.embed_images_with_outputs(
                pixel_values.to(self.dtype), output_attentions=bool(encoder_outputs.get("output_attentions"))
            )
            media["image"] = images.flatten(0, 1)
        elif pixel_values is not None:
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
        placeholder_ids = self.placeholder_ids()
        masks = self.placeholder_masks(input_ids, inputs_embeds)
        # The placeholder checks read token counts on the host; a traced graph (torch.compile / export) cannot
        # branch on them, so they run in eager mode only.
        check = not torch.compiler.is_compiling()
        for name, rows in media.items():
            if name not in placeholder_ids:
                raise ValueError(f"{name} inputs given but config.{name}_token_id is not set")
            mask = masks[name]
            n_tokens = int(mask.sum()) if check else rows.shape[0]
            if n_tokens != rows.shape[0]:
                raise ValueError(
                    f"{n_tokens} {name} placeholder tokens in input_ids but the {name} inputs give {rows.shape[0]} "
                    f"embeddings: the processor and the model config disagree, or media and placeholders do not match"
                )
            embeds = embeds.masked_scatter(mask.unsqueeze(-1).expand_as(embeds), rows.to(embeds.dtype))
        for name, token_id in placeholder_ids.items():
            if check and name not in media and bool(masks[name].any()):
                raise ValueError(f"input_ids contain {name} placeholder tokens but no {name} inputs were given")
        return embeds

    def placeholder_masks(
        self, input_ids: torch.Tensor | None, inputs_embeds: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]:
        """{modality: [B, T] bool} placeholder positions, from the ids, or else from the embeddings: a row equal to
        the placeholder token's embedding is a placeholder (how transformers' vision-language models find them)."""
        masks = {}
        for name, token_id in self.placeholder_ids().items():
            if input_ids is not None:
                masks[name] = input_ids == token_id
            else:
                token = self.model.embed_tokens.weight[token_id].to(inputs_embeds)
                masks[name] = (inputs_embeds == token).all(dim=-1)
        return masks

    def modality_ids_from_embeds(self, inputs_embeds: torch.Tensor) -> torch.Tensor:
        """Modality ids of given embeddings: placeholder rows (`placeholder_masks`) are their medium, the rest text."""
        modality_ids = torch.zeros(inputs_embeds.shape[:2], dtype=torch.long, device=inputs_embeds.device)
        for name, mask in self.placeholder_masks(None, inputs_embeds).items():
            if name in self.config.modalities:
                modality_ids = modality_ids.masked_fill(mask, self.config.modality_id(name))
        return modality_ids

    def prepare_inputs_for_generation(self, input_ids, cache=None, inputs_embeds=None, **kwargs):
        # `inputs_embeds` named here: generate() accepts embeddings only from models whose signature names them
        inputs = super().prepare_inputs_for_generation(input_ids, cache=cache, inputs_embeds=inputs_embeds, **kwargs)
        if inputs.get("input_ids") is not None:
            inputs.pop("modality_ids", None)  # follows exactly from the ids, whatever their length this step
        if cache is not None and cache.get_seq_length() > 0:
            for key in MEDIA_INPUTS:  # decode steps: media were merged at prefill, new tokens are text
                inputs.pop(key, None)
        return inputs

    # ------------------------------------------------------------------ forward
    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    @can_return_tuple
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
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        run_every_tower: bool = False,
        **kwargs: Any,
    ) -> OmniMoeCausalLMOutput:
        """Inputs: docs/architecture.md ("Model inputs"). `inputs_embeds` replace `input_ids` (media are then
        placed on the rows equal to a placeholder's embedding, as in transformers' vision-language models); their
        `modality_ids` default to those placeholders' media, text elsewhere. Loss kwargs (`num_items_in_batch`,
        `shift_labels`, `ignore_index`) follow transformers' causal-LM loss; the rest (`output_hidden_states`,
        `output_attentions`, attention-kernel kwargs) go to the decoder."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids or inputs_embeds")
        num_items_in_batch = kwargs.pop("num_items_in_batch", None)
        shift_labels = kwargs.pop("shift_labels", None)
        ignore_index = kwargs.pop("ignore_index", IGNORE_INDEX)
        if modality_ids is None:
            # before the media are merged: given embeddings show their placeholders only until then
            modality_ids = (self.modality_ids_from_input_ids(input_ids) if input_ids is not None
                            else self.modality_ids_from_embeds(inputs_embeds))
        # the vision tower's own hidden states / attentions ride along when the decoder's are asked for
        output_attentions = kwargs.get("output_attentions", self.config.output_attentions)
        wants_outputs = output_attentions or kwargs.get("output_hidden_states", self.config.output_hidden_states)
        encoder_outputs = {"output_attentions": output_attentions} if wants_outputs else None
        inputs_embeds = self.embed_inputs(
            input_ids, pixel_values, pixel_values_videos, audio_features, audio_chunk_counts, audio_token_counts,
            run_every_tower=run_every_tower, inputs_embeds=inputs_embeds, encoder_outputs=encoder_outputs,
        )
        use_cache = use_cache if use_cache is not None else (self.config.use_cache and not self.training)
        if position_ids is None and rope_deltas is not None:
            # continue a processed prompt: sequence index + (max prompt position + 1 - prompt length), on all 3 rows
            past = cache.get_seq_length() if cache is not None else 0
            steps = torch.arange(past, past + inputs_embeds.shape[1], device=inputs_embeds.device)
            position_ids = (steps[None, :] + rope_deltas.to(steps.device).view(-1, 1)).unsqueeze(0).expand(3, -1, -1)

        outputs = self.model(
            inputs_embeds=inputs_embeds, modality_ids=modality_ids, attention_mask=attention_mask,
            position_ids=position_ids, cache=cache, use_cache=use_cache, **kwargs,
        )
        logits = self.lm_head(slice_logits_to_keep(outputs.last_hidden_state, logits_to_keep))

        router_outputs = outputs.router_outputs
        ce_loss = aux_loss = z_loss = loss = None
        if router_outputs:
            aux_loss = torch.stack([r.aux_loss for r in router_outputs]).mean()
            z_loss = torch.stack([r.z_loss for r in router_outputs]).mean()
        if labels is not None or shift_labels is not None:
            ce_loss = causal_lm_loss(logits, labels, num_items_in_batch, shift_labels, ignore_index)
            loss = ce_loss
            if aux_loss is not None:
                router_loss = self.config.router_aux_loss_coef * aux_loss + self.config.router_z_loss_coef * z_loss
                if num_items_in_batch is not None:
                    # the CE above is this micro-batch's share of the whole batch's mean; give the router losses
                    # (means over this micro-batch) the same share, by label count, so the accumulated sum is a
                    # label-weighted mean rather than k times one micro-batch's
                    targets = shift_labels if shift_labels is not None else labels[:, 1:]
                    share = (targets != ignore_index).sum().to(router_loss.dtype)
                    router_loss = router_loss * share / torch.as_tensor(num_items_in_batch).to(router_loss)
                loss = loss + router_loss
        return OmniMoeCausalLMOutput(
            loss=loss,
            logits=logits,
            cache=outputs.cache,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            ce_loss=ce_loss,
            aux_loss=aux_loss,
            z_loss=z_loss,
            router_outputs=router_outputs,
            image_outputs=encoder_outputs.get("image") if encoder_outputs else None,
        )


def causal_lm_loss(
    logits: torch.Tensor,
    labels: torch.Tensor | None,
    num_items_in_batch: torch.Tensor | int | None = None,
    shift_labels: torch.Tensor | None = None,
    ignore_index: int = IGNORE_INDEX,
) -> torch.Tensor:
    """Next-token cross-entropy in fp32, summed over labelled positions and divided by `num_items_in_batch` when given
    (the Trainer's label count over all accumulated micro-batches), else by this batch's label count (0, with a
    graph, when nothing is labelled). `shift_labels` [B, T] are targets already aligned with the logits (sequence
    parallelism passes them); otherwise `labels` are shifted left by one.
    """
    if shift_labels is None:
        shift_labels = F.pad(labels, (0, 1), value=ignore_index)[:, 1:]
    flat_logits = logits.float().reshape(-1, logits.shape[-1])
    targets = shift_labels.reshape(-1).to(logits.device)
    summed = F.cross_entropy(flat_logits, targets, ignore_index=ignore_index, reduction="sum")
    if num_items_in_batch is not None:
        return summed / torch.as_tensor(num_items_in_batch).to(summed)
    return summed / (targets != ignore_index).sum().clamp(min=1)


OmniMoeConfig.register_for_auto_class()
OmniMoeForCausalLM.register_for_auto_class("AutoModelForCausalLM")

OmniMoeModel.register_for_auto_class("AutoModel")

__all__ = ["OmniMoeForCausalLM", "OmniMoeModel", "OmniMoePreTrainedModel", "OmniMoeCausalLMOutput", "causal_lm_loss"]
