"""The media tower: encoders + projectors that turn images, videos and audio into LLM-width token embeddings.

The token-count functions below depend on the config only; the processor uses them to expand placeholders, so
they must agree exactly with what the tower returns (tests check every combination we ship).

Token layout:
  image  - MLP: the pooled patch grid, row-major, grid (ceil(h/k), ceil(w/k)); Q-Former: Q queries, grid (1, Q).
  video  - frames averaged in groups of `video_temporal_pooling` (a last, shorter group averages what it has),
           then each group laid out as one image; frame-major (t, then h, then w).
  audio  - MLP: Whisper frames (20 ms each at 16 kHz / hop 160) of a clip's chunks concatenated in time,
           averaged in groups of `audio_pooling`, truncated to the frames that saw real audio;
           Q-Former: Q tokens per chunk of `frames_per_chunk` mel frames.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import nn

from .configuration_omni import OmniMoeConfig
from .encoders import AudioEncoder, VisionEncoder, vision_grid_size, whisper_frames_per_chunk
from .projectors import MLPProjector, QFormerConnector, pool_grid, pool_sequence


# ---------------------------------------------------------------------------------------------- token counts
def _require(config, name: str, what: str):
    sub = getattr(config, name, None)
    if sub is None:
        raise ValueError(f"{what}: the model has no {name} (this config has no encoder for that modality)")
    return sub


def image_token_grid(config) -> tuple[int, int]:
    """(h, w) of the tokens one image (or one pooled video frame group) becomes."""
    vision_config = _require(config, "vision_config", "image_token_grid")
    if config.image_projector == "qformer":
        return 1, int(config.qformer_num_queries)
    h, w = vision_grid_size(vision_config)
    k = int(config.image_pooling)
    return math.ceil(h / k), math.ceil(w / k)


def image_token_count(config) -> int:
    h, w = image_token_grid(config)
    return h * w


def video_token_grid(config, num_frames: int) -> tuple[int, int, int]:
    """(t, h, w) after temporal pooling of `num_frames` frames and spatial pooling of each group."""
    if num_frames < 1:
        raise ValueError(f"video_token_grid: a video needs at least one frame, got {num_frames}")
    h, w = image_token_grid(config)
    return math.ceil(num_frames / int(config.video_temporal_pooling)), h, w


def video_token_count(config, num_frames: int) -> int:
    t, h, w = video_token_grid(config, num_frames)
    return t * h * w


def _mel_frames(num_samples: int, hop_length: int) -> int:
    # WhisperFeatureExtractor's centred STFT gives num_samples // hop + 1 frames and drops the last one
    if num_samples < 1:
        raise ValueError(f"audio: a clip needs at least one sample, got {num_samples}")
    if hop_length < 1:
        raise ValueError(f"audio: hop_length must be >= 1, got {hop_length}")
    return num_samples // hop_length


def audio_chunk_count(config, num_samples: int, hop_length: int = 160) -> int:
    """Encoder chunks (of `frames_per_chunk` mel frames) a clip of `num_samples` samples is split into."""
    audio_config = _require(config, "audio_config", "audio_chunk_count")
    frames = _mel_frames(num_samples, hop_length)
    return max(1, math.ceil(frames / whisper_frames_per_chunk(audio_config)))


def audio_valid_encoder_frames(num_samples: int, hop_length: int = 160) -> int:
    """Whisper encoder frames that saw real audio (stride-2 conv: ceil(mel_frames / 2))."""
    return math.ceil(_mel_frames(num_samples, hop_length) / 2)


def audio_token_count(config, num_samples: int, sampling_rate: int = 16000, hop_length: int = 160) -> int:
    """LLM tokens for a clip of `num_samples` samples (at `sampling_rate`, the feature extractor's rate).

    At least one token, so that a very short clip still has a placeholder.
    """
    if sampling_rate <= 0:
        raise ValueError(f"audio_token_count: sampling_rate must be positive, got {sampling_rate}")
    if config.audio_projector == "qformer":
        return audio_chunk_count(config, num_samples, hop_length) * int(config.qformer_num_queries)
    _require(config, "audio_config", "audio_token_count")
    return max(1, math.ceil(audio_valid_encoder_frames(num_samples, hop_length) / int(config.audio_pooling)))


def audio_seconds_per_token(config, hop_length: int = 160, sampling_rate: int = 16000) -> float:
    """Seconds of audio between consecutive audio tokens (for the time component of the 3D position ids)."""
    audio_config = _require(config, "audio_config", "audio_seconds_per_token")
    if config.audio_projector == "qformer":
        chunk_seconds = whisper_frames_per_chunk(audio_config) * hop_length / sampling_rate
        return chunk_seconds / int(config.qformer_num_queries)
    return 2 * hop_length * int(config.audio_pooling) / sampling_rate


# ---------------------------------------------------------------------------------------------- the tower
def _build_projector(kind: str, in_dim: int, config) -> nn.Module:
    if kind == "mlp":
        return MLPProjector(in_dim, config.hidden_size, getattr(config, "projector_hidden_act", "gelu"))
    if kind == "qformer":
        return QFormerConnector(
            in_dim,
            config.hidden_size,
            num_queries=int(config.qformer_num_queries),
            num_layers=int(config.qformer_num_layers),
            num_heads=int(config.qformer_num_heads),
            ffn_dim=getattr(config, "qformer_ffn_dim", None),
        )
    raise ValueError(f"OmniMediaTower: unknown projector {kind!r}; expected 'mlp' or 'qformer'")


def _as_list(counts, name: str) -> list[int]:
    if isinstance(counts, torch.Tensor):
        if counts.dim() != 1:
            raise ValueError(f"embed_audios: {name} must be 1-D, got shape {tuple(counts.shape)}")
        return [int(c) for c in counts.tolist()]
    return [int(c) for c in counts]


class OmniMediaTower(nn.Module):
    """Vision encoder + image projector (shared by video), audio encoder + audio projector.

    A modality without an encoder in the config has None for its modules.
    """

    def __init__(self, config: OmniMoeConfig):
        super().__init__()
        self.config = config
        self.vision_encoder = self.image_projector = None
        self.audio_encoder = self.audio_projector = None
        if config.vision_config is not None:
            self.vision_encoder = VisionEncoder(
                config.vision_config, config.vision_feature_layer, config.vision_drop_cls
            )
            if self.vision_encoder.num_tokens != self.vision_encoder.num_patches:
                raise ValueError(
                    "OmniMediaTower: vision_drop_cls=False keeps CLIP's CLS token, but image tokens must form an "
                    "h x w patch grid (pooling, 3D positions); set vision_drop_cls=True"
                )
            self.image_projector = _build_projector(config.image_projector, self.vision_encoder.output_dim, config)
        if config.audio_config is not None:
            self.audio_encoder = AudioEncoder(config.audio_config)
            self.audio_projector = _build_projector(config.audio_projector, self.audio_encoder.output_dim, config)

    # ------------------------------------------------------------------ vision
    def _vision(self, what: str) -> VisionEncoder:
        if self.vision_encoder is None:
            raise ValueError(f"OmniMediaTower.{what}: this model has no vision encoder (config.vision_config is None)")
        return self.vision_encoder

    def _project_frames(self, features: torch.Tensor) -> torch.Tensor:
        """[N, h*w, Dv] patch states -> [N, image_token_count, D_llm]."""
        pooled = pool_grid(features, self.vision_encoder.grid_size, int(self.config.image_pooling))
        return self.image_projector(pooled)

    def embed_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.embed_images_with_outputs(pixel_values)[0]

    def embed_images_with_outputs(self, pixel_values: torch.Tensor, output_attentions: bool = False):
        """(`embed_images`' result, the vision tower's own output: its hidden states, and attentions if asked)."""
        encoder = self._vision("embed_images")
        if pixel_values.dim() != 4:
            raise ValueError(f"embed_images: expected pixel_values [N, 3, H, W], got {tuple(pixel_values.shape)}")
        features, outputs = encoder.encode(pixel_values, output_attentions=output_attentions)
        return self._project_frames(features), outputs

    def embed_videos(self, pixel_values_videos: torch.Tensor) -> torch.Tensor:
        encoder = self._vision("embed_videos")
        if pixel_values_videos.dim() != 5:
            raise ValueError(
                f"embed_videos: expected pixel_values_videos [N, F, 3, H, W], got {tuple(pixel_values_videos.shape)}"
            )
        n, f = pixel_values_videos.shape[:2]
        # every frame of every video in one encoder batch
        features = encoder(pixel_values_videos.flatten(0, 1))  # [N*F, hw, Dv]
        hw, dv = features.shape[1:]
        k = int(self.config.video_temporal_pooling)
        if k > 1:
            # averaging whole frames == pooling over the frame axis of [N, F, hw*Dv]
            features = pool_sequence(features.reshape(n, f, hw * dv), k)
        groups = features.reshape(n, -1, hw, dv)
        t = groups.shape[1]
        tokens = self._project_frames(groups.reshape(n * t, hw, dv))  # [N*T, tokens_per_frame, D]
        return tokens.reshape(n, t * tokens.shape[1], tokens.shape[2])

    # ------------------------------------------------------------------ audio
    def embed_audios(
        self,
        audio_features: torch.Tensor,
        audio_chunk_counts: torch.Tensor | Sequence[int],
        audio_token_counts: torch.Tensor | Sequence[int],
        audio_frame_counts: torch.Tensor | Sequence[int] | None = None,
    ) -> torch.Tensor:
        """[N_chunks, n_mels, frames] -> [sum(audio_token_counts), D_llm], clips in order.

        `audio_frame_counts` (optional, [N_aud]): mel frames of real audio per clip (num_samples // hop). The
        Q-Former then ignores encoder frames that only saw padding; the MLP path needs no help (it truncates).
        """
        if self.audio_encoder is None:
            raise ValueError(
                "OmniMediaTower.embed_audios: this model has no audio encoder (config.audio_config is None)"
            )
        chunks = _as_list(audio_chunk_counts, "audio_chunk_counts")
        wanted = _as_list(audio_token_counts, "audio_token_counts")
        if len(chunks) != len(wanted):
            raise ValueError(f"embed_audios: {len(chunks)} chunk counts but {len(wanted)} token counts")
        if sum(chunks) != audio_features.shape[0] or any(c < 1 for c in chunks):
            raise ValueError(
                f"embed_audios: chunk counts {chunks} (each >= 1) must sum to the {audio_features.shape[0]} chunks given"
            )
        if not chunks:
            return audio_features.new_zeros(0, self.config.hidden_size)
        states = self.audio_encoder(audio_features)  # [N_chunks, frames_out, Da]
        frames_out = states.shape[1]
        if self.config.audio_projector == "qformer":
            mask = None
            if audio_frame_counts is not None:
                mask = self._qformer_frame_mask(chunks, _as_list(audio_frame_counts, "audio_frame_counts"), frames_out)
                mask = mask.to(states.device)
            per_chunk = self.audio_projector(states, mask)  # [N_chunks, Q, D]
            clips = per_chunk.split(chunks)  # chunk-major within a clip: (chunk, query)
            tokens = [self._take(c.reshape(-1, c.shape[-1]), need, i) for i, (c, need) in enumerate(zip(clips, wanted))]
            return torch.cat(tokens)
        k = int(self.config.audio_pooling)
        pooled = []
        for i, (clip, need) in enumerate(zip(states.split(chunks), wanted)):
            sequence = clip.reshape(1, -1, clip.shape[-1])  # the clip's chunks concatenated in time
            pooled.append(self._take(pool_sequence(sequence, k)[0], need, i))
        # one projector call for every clip's tokens
        return self.audio_projector(torch.cat(pooled))

    @staticmethod
    def _take(tokens: torch.Tensor, need: int, clip_index: int) -> torch.Tensor:
        if not 1 <= need <= tokens.shape[0]:
            raise ValueError(
                f"embed_audios: audio clip {clip_index} asks for {need} tokens but its chunks give {tokens.shape[0]} "
                "(audio_token_count and audio_chunk_count must come from the same config)"
            )
        return tokens[:need]

    @staticmethod
    def _qformer_frame_mask(chunks: list[int], mel_frames: list[int], frames_out: int) -> torch.Tensor:
        if len(mel_frames) != len(chunks):
            raise ValueError(f"embed_audios: {len(mel_frames)} frame counts for {len(chunks)} clips")
        rows = []
        for n_chunks, mel in zip(chunks, mel_frames):
            valid = max(1, math.ceil(mel / 2))  # stride-2 conv: encoder frames that saw real audio
            positions = torch.arange(n_chunks * frames_out).reshape(n_chunks, frames_out)
            rows.append(positions < valid)
        return torch.cat(rows)


__all__ = [
    "OmniMediaTower",
    "image_token_grid",
    "image_token_count",
    "video_token_grid",
    "video_token_count",
    "audio_token_count",
    "audio_chunk_count",
    "audio_seconds_per_token",
    "audio_valid_encoder_frames",
]
