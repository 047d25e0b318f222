"""Modality encoders: a CLIP/SigLIP vision tower and the Whisper audio encoder.

Both wrap the transformers implementation (held as `self.model`) so pretrained checkpoints load unchanged and
their outputs equal the upstream model's. Whether they train is the trainer's business (requires_grad).
"""

from __future__ import annotations

import contextlib
import json
import os

import torch
from torch import nn
from transformers import CLIPVisionModel, PretrainedConfig, PreTrainedModel, SiglipVisionModel
from transformers.models.whisper.modeling_whisper import WhisperEncoder
from transformers.utils import logging as hf_logging

# model_type of a vision-only config -> (model class, whether its sequence starts with a CLS token)
_VISION_TOWERS = {
    "clip_vision_model": (CLIPVisionModel, True),
    "siglip_vision_model": (SiglipVisionModel, False),
}
# A full two-tower checkpoint holds the vision tower under `vision_model.`; transformers strips that prefix
# when the vision class loads the folder, so only the config's model_type needs translating.
_FULL_TO_VISION_TYPE = {"clip": "clip_vision_model", "siglip": "siglip_vision_model"}
_WHISPER_TYPES = ("whisper",)
# The `model_type`s a local encoder checkpoint folder may have (a recipe's paths are checked against these).
VISION_CHECKPOINT_TYPES = (*_VISION_TOWERS, *_FULL_TO_VISION_TYPE)
AUDIO_CHECKPOINT_TYPES = _WHISPER_TYPES
# WhisperModel stores the encoder under `encoder.`, WhisperForConditionalGeneration under `model.encoder.`
# (regexes, applied by transformers' `key_mapping`).
_WHISPER_ENCODER_KEYS = {r"^(model\.)?encoder\.": ""}


def _read_model_type(path: str | os.PathLike, what: str) -> str:
    config_file = os.path.join(os.fspath(path), "config.json")
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{what}: {os.fspath(path)!r} is not a local directory (hub downloads are not used)")
    if not os.path.isfile(config_file):
        raise FileNotFoundError(f"{what}: no config.json in {os.fspath(path)!r}")
    try:
        with open(config_file, encoding="utf-8") as f:
            return str(json.load(f).get("model_type"))
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"{what}: cannot read {config_file!r}: {err}") from err


@contextlib.contextmanager
def _quiet_transformers():
    """Silence transformers' load report: loading one tower of a two-tower checkpoint lists every key of the
    other tower as UNEXPECTED. We check missing keys ourselves, so nothing that matters is hidden."""
    previous = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(previous)


def _load_checked(model_cls, path, what: str, **kwargs) -> PreTrainedModel:
    with _quiet_transformers():
        model, info = model_cls.from_pretrained(os.fspath(path), output_loading_info=True, **kwargs)
    missing = sorted(info.get("missing_keys") or [])
    if missing:
        # transformers would silently leave these randomly initialised
        shown = ", ".join(missing[:5]) + (" ..." if len(missing) > 5 else "")
        raise ValueError(f"{what}: checkpoint {os.fspath(path)!r} lacks {len(missing)} weights of the tower ({shown})")
    return model


def _pair(value) -> tuple[int, int]:
    if isinstance(value, (list, tuple)):
        return int(value[0]), int(value[1])
    return int(value), int(value)


def vision_grid_size(vision_config: PretrainedConfig) -> tuple[int, int]:
    """Patches per side (rows, cols) of a CLIP/SigLIP vision config at its native image size."""
    image_h, image_w = _pair(vision_config.image_size)
    patch_h, patch_w = _pair(vision_config.patch_size)
    return image_h // patch_h, image_w // patch_w


def whisper_frames_per_chunk(audio_config: PretrainedConfig) -> int:
    """Mel frames per encoder call: Whisper's second conv has stride 2, so 2 mel frames per encoder position."""
    return 2 * int(audio_config.max_source_positions)


class VisionEncoder(nn.Module):
    """CLIP or SigLIP vision tower returning the patch states of one hidden layer (LLaVA-style features)."""

    def __init__(
        self,
        vision_config: PretrainedConfig,
        feature_layer: int = -2,
        drop_cls: bool = True,
        *,
        model: PreTrainedModel | None = None,
    ):
        """`model`: an already-built (e.g. loaded) tower to wrap instead of building a randomly initialised one."""
        super().__init__()
        model_type = getattr(vision_config, "model_type", None)
        if model_type not in _VISION_TOWERS:
            raise ValueError(
                f"VisionEncoder: vision_config.model_type must be one of {sorted(_VISION_TOWERS)}, got {model_type!r}"
            )
        model_cls, self.has_cls = _VISION_TOWERS[model_type]
        num_layers = int(vision_config.num_hidden_layers)
        # hidden_states holds the embeddings plus one entry per layer
        if not -(num_layers + 1) <= feature_layer <= num_layers:
            raise ValueError(f"VisionEncoder: feature_layer {feature_layer} outside the {num_layers + 1} hidden states")
        self.feature_layer = int(feature_layer)
        self.drop_cls = bool(drop_cls)
        self.model = model if model is not None else model_cls._from_config(vision_config)

    @classmethod
    def from_pretrained(cls, path, feature_layer: int = -2, drop_cls: bool = True, dtype=None) -> "VisionEncoder":
        """Load a local CLIPVisionModel/SiglipVisionModel folder, or the vision tower of a CLIPModel/SiglipModel one."""
        model_type = _read_model_type(path, "VisionEncoder.from_pretrained")
        model_type = _FULL_TO_VISION_TYPE.get(model_type, model_type)
        if model_type not in _VISION_TOWERS:
            raise ValueError(
                f"VisionEncoder.from_pretrained: {os.fspath(path)!r} holds a {model_type!r} checkpoint, "
                f"not a CLIP/SigLIP vision model or a full CLIP/SigLIP model"
            )
        model_cls, _ = _VISION_TOWERS[model_type]
        kwargs = {"dtype": dtype} if dtype is not None else {}
        model = _load_checked(model_cls, path, "VisionEncoder.from_pretrained", **kwargs)
        return cls(model.config, feature_layer=feature_layer, drop_cls=drop_cls, model=model)

    @property
    def config(self) -> PretrainedConfig:
        return self.model.config

    @property
    def grid_size(self) -> tuple[int, int]:
        return vision_grid_size(self.model.config)

    @property
    def num_patches(self) -> int:
        h, w = self.grid_size
        return h * w

    @property
    def num_tokens(self) -> int:
        """Tokens `forward` returns per image: the patches, plus CLS when it is kept."""
        return self.num_patches + int(self.has_cls and not self.drop_cls)

    @property
    def output_dim(self) -> int:
        return int(self.model.config.hidden_size)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """[N, 3, H, W] -> [N, num_tokens, Dv]: hidden state of `feature_layer` (CLS dropped when asked)."""
        return self.encode(pixel_values)[0]

    def encode(self, pixel_values: torch.Tensor, output_attentions: bool = False):
        """(features as `forward` gives them, the tower's own output: hidden states, and attentions if asked)."""
        dtype = next(self.model.parameters()).dtype
        outputs = self.model(
            pixel_values=pixel_values.to(dtype), output_hidden_states=True, output_attentions=output_attentions
        )
        features = outputs.hidden_states[self.feature_layer]
        if self.has_cls and self.drop_cls:
            features = features[:, 1:]
        return features, outputs


class AudioEncoder(nn.Module):
    """Whisper's encoder: [N_chunks, n_mels, frames_per_chunk] log-mels -> [N_chunks, max_source_positions, Da]."""

    def __init__(self, audio_config: PretrainedConfig, *, model: WhisperEncoder | None = None):
        """`model`: an already-built (e.g. loaded) encoder to wrap instead of building a randomly initialised one."""
        super().__init__()
        model_type = getattr(audio_config, "model_type", None)
        if model_type not in _WHISPER_TYPES:
            raise ValueError(f"AudioEncoder: audio_config.model_type must be 'whisper', got {model_type!r}")
        self.model = model if model is not None else WhisperEncoder._from_config(audio_config)

    @classmethod
    def from_pretrained(cls, path, dtype=None) -> "AudioEncoder":
        """Take the encoder weights of a local WhisperModel / WhisperForConditionalGeneration folder."""
        model_type = _read_model_type(path, "AudioEncoder.from_pretrained")
        if model_type not in _WHISPER_TYPES:
            raise ValueError(
                f"AudioEncoder.from_pretrained: {os.fspath(path)!r} holds a {model_type!r} checkpoint, not Whisper"
            )
        kwargs = {"dtype": dtype} if dtype is not None else {}
        model = _load_checked(
            WhisperEncoder, path, "AudioEncoder.from_pretrained", key_mapping=dict(_WHISPER_ENCODER_KEYS), **kwargs
        )
        return cls(model.config, model=model)

    @property
    def config(self) -> PretrainedConfig:
        return self.model.config

    @property
    def frames_per_chunk(self) -> int:
        return whisper_frames_per_chunk(self.model.config)

    @property
    def frames_out(self) -> int:
        """Encoder positions per chunk."""
        return int(self.model.config.max_source_positions)

    @property
    def output_dim(self) -> int:
        return int(self.model.config.d_model)

    def forward(self, input_features: torch.Tensor) -> torch.Tensor:
        if input_features.dim() != 3 or input_features.shape[-1] != self.frames_per_chunk:
            raise ValueError(
                f"AudioEncoder: expected log-mels [N_chunks, n_mels, {self.frames_per_chunk}], "
                f"got {tuple(input_features.shape)}"
            )
        dtype = next(self.model.parameters()).dtype
        return self.model(input_features.to(dtype)).last_hidden_state


__all__ = ["VisionEncoder", "AudioEncoder", "vision_grid_size", "whisper_frames_per_chunk"]
