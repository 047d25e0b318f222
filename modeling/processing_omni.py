"""`OmniMoeProcessor`: chat conversations with images, videos and audio -> model inputs.

A conversation is a list of messages `{"role": "system" | "user" | "assistant", "content": str | list[part]}` with
parts `{"type": "text", "text": str}` or `{"type": "image" | "video" | "audio"}`. Each media part becomes its
placeholder token ("<|image|>", ...) repeated exactly as many times as the model produces embeddings for that
medium (the counting functions of `media.py`, shared with the model), plus per-token modality ids, labels on the
assistant turns only, and Omni 3D-RoPE position ids (`positions.py`).

Text is always plain text: a user typing "<|im_start|>" or "<|image|>" gets ordinary byte-level tokens, because the
text runs are tokenized with `split_special_tokens=True` and the structural special ids are inserted by id.
The layout is ChatML as rendered by `CHAT_TEMPLATE`, so for text without special strings the ids equal
`tokenizer(apply_chat_template(conversation, tokenize=False))`. This class turns media into encoder inputs and
placeholder counts; the layout, tokenization and padding are `chat_layout.py`'s.
"""

from __future__ import annotations

import inspect
from typing import Any

import numpy as np
import torch
from transformers import BatchFeature, ProcessorMixin
from transformers.models.auto import AutoFeatureExtractor, AutoImageProcessor, AutoTokenizer

from .configuration_omni import DEFAULT_MODALITIES, OmniMoeConfig
from .media import (
    audio_chunk_count,
    audio_seconds_per_token,
    audio_token_count,
    image_token_count,
    image_token_grid,
    video_token_count,
    video_token_grid,
)
from .chat_layout import (
    IGNORE_INDEX,
    MEDIA_TYPES,
    count_media_parts,
    layout_conversation,
    pad_samples,
    tokenize_layouts,
)
from .tokenizer_utils import CHAT_TEMPLATE, IM_END, IM_START, MEDIA_PLACEHOLDERS, PAD_TOKEN

# Sub-processors a model without that encoder does not have (ProcessorMixin itself requires all of them).
OPTIONAL_SUB_PROCESSORS = ("image_processor", "feature_extractor")


class OmniMoeProcessor(ProcessorMixin):
    r"""Tokenizer + image processor (CLIP/SigLIP) + Whisper feature extractor for `OmniMoeForCausalLM`.

    The token-count settings are plain attributes mirroring the `OmniMoeConfig` fields of the same meaning, so they
    round-trip through processor_config.json and the processor needs no model config at call time.
    `image_processor` / `feature_extractor` may be None for a model without that encoder.
    """

    attributes = ["image_processor", "feature_extractor", "tokenizer"]

    # No keyword-only marker: ProcessorMixin.from_args_and_dict only passes saved settings that are positional-or-
    # keyword parameters (co_argcount), so keyword-only settings would be dropped silently on from_pretrained.
    def __init__(
        self,
        image_processor=None,
        feature_extractor=None,
        tokenizer=None,
        chat_template=None,
        modalities=DEFAULT_MODALITIES,
        vision_model_type="clip_vision_model",
        image_size=None,
        patch_size=None,
        image_pooling=1,
        image_projector="mlp",
        video_num_frames=4,
        video_temporal_pooling=1,
        video_fps=2.0,
        audio_max_source_positions=None,
        audio_num_mel_bins=80,
        audio_pooling=1,
        audio_projector="mlp",
        qformer_num_queries=32,
        positions_per_second=25.0,
        max_length=None,
        **kwargs,
    ):
        if tokenizer is None:
            raise ValueError("OmniMoeProcessor needs a tokenizer (train one with omni_moe.data.tokenizer.build_bpe_tokenizer, or add our special tokens with tokenizer_utils.ensure_special_tokens)")
        self.modalities = list(modalities)
        self.vision_model_type = vision_model_type
        self.image_size = image_size
        self.patch_size = patch_size
        self.image_pooling = int(image_pooling)
        self.image_projector = image_projector
        self.video_num_frames = int(video_num_frames)
        self.video_temporal_pooling = int(video_temporal_pooling)
        self.video_fps = float(video_fps)
        self.audio_max_source_positions = audio_max_source_positions
        self.audio_num_mel_bins = int(audio_num_mel_bins)
        self.audio_pooling = int(audio_pooling)
        self.audio_projector = audio_projector
        self.qformer_num_queries = int(qformer_num_queries)
        self.positions_per_second = float(positions_per_second)
        self.max_length = max_length
        if self.video_num_frames < 1:
            raise ValueError(f"video_num_frames must be >= 1, got {video_num_frames}")
        chat_template = chat_template if chat_template is not None else CHAT_TEMPLATE
        super().__init__(image_processor, feature_extractor, tokenizer, chat_template=chat_template, **kwargs)
        vocab = tokenizer.get_vocab()
        missing = [t for t in (PAD_TOKEN, IM_START, IM_END, *MEDIA_PLACEHOLDERS.values()) if t not in vocab]
        if missing:
            raise ValueError(f"OmniMoeProcessor: tokenizer lacks the special tokens {missing}; "
                             "add them with tokenizer_utils.ensure_special_tokens(tokenizer)")
        self._count_config = self._build_count_config()

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_config(cls, config: OmniMoeConfig, tokenizer, image_processor=None, feature_extractor=None, **kwargs):
        """A processor whose token counts match `config`; builds a default image processor / Whisper feature
        extractor sized for the config's encoders when none is given."""
        vision, audio = config.vision_config, config.audio_config
        same_names = ("image_pooling", "image_projector", "video_temporal_pooling", "audio_pooling", "audio_projector",
                      "qformer_num_queries")
        settings: dict[str, Any] = {name: getattr(config, name) for name in same_names}
        settings.update(modalities=list(config.modalities), positions_per_second=config.rope_positions_per_second)
        if vision is not None:
            settings.update(vision_model_type=vision.model_type, image_size=vision.image_size, patch_size=vision.patch_size)
            if image_processor is None:
                image_processor = _default_image_processor(vision.model_type, vision.image_size)
        if audio is not None:
            settings.update(audio_max_source_positions=audio.max_source_positions, audio_num_mel_bins=audio.num_mel_bins)
            if feature_extractor is None:
                feature_extractor = _default_feature_extractor(audio.num_mel_bins, 2 * audio.max_source_positions)
        settings.update(kwargs)
        processor = cls(image_processor, feature_extractor, tokenizer, **settings)
        for medium, token in MEDIA_PLACEHOLDERS.items():
            expected = getattr(config, f"{medium}_token_id", None)
            actual = tokenizer.convert_tokens_to_ids(token)
            if expected is not None and expected != actual:
                raise ValueError(f"config.{medium}_token_id is {expected} but the tokenizer gives {token} id {actual}")
        return processor

    def _build_count_config(self) -> OmniMoeConfig:
        """A minimal OmniMoeConfig carrying only what media.py's counting functions read (tiny LLM dims)."""
        vision = audio = None
        if self.image_size is not None:
            vision = {"model_type": self.vision_model_type, "image_size": self.image_size, "patch_size": self.patch_size,
                      "hidden_size": 8, "intermediate_size": 8, "num_hidden_layers": 1, "num_attention_heads": 1}
        if self.audio_max_source_positions is not None:
            audio = {"model_type": "whisper", "max_source_positions": self.audio_max_source_positions,
                     "num_mel_bins": self.audio_num_mel_bins, "d_model": 8, "encoder_layers": 1,
                     "encoder_attention_heads": 1, "decoder_layers": 1, "decoder_attention_heads": 1}
        return OmniMoeConfig(
            vocab_size=8, hidden_size=8, intermediate_size=8, num_hidden_layers=1, num_attention_heads=1,
            num_key_value_heads=1, moe_layers="none", modalities=self.modalities, vision_config=vision,
            audio_config=audio, image_pooling=self.image_pooling,
            image_projector=self.image_projector, video_temporal_pooling=self.video_temporal_pooling,
            audio_pooling=self.audio_pooling, audio_projector=self.audio_projector,
            qformer_num_queries=self.qformer_num_queries, rope_positions_per_second=self.positions_per_second,
        )

    # ------------------------------------------------------------------ ProcessorMixin: optional sub-processors
    def check_argument_for_proper_class(self, argument_name, argument):
        if argument is None and argument_name in OPTIONAL_SUB_PROCESSORS:
            return None
        return super().check_argument_for_proper_class(argument_name, argument)

    def save_pretrained(self, save_directory, push_to_hub: bool = False, **kwargs):
        # ProcessorMixin saves every sub-processor named in __init__ and fails on a None one. Shadow get_attributes
        # on this instance for the call so it sees only the present ones; to_dict (class-level list) still records
        # an absent one as null, which from_pretrained reads back as None.
        present = [name for name in type(self).get_attributes() if getattr(self, name) is not None]
        self.get_attributes = lambda: present
        try:
            return super().save_pretrained(save_directory, push_to_hub=push_to_hub, **kwargs)
        finally:
            del self.get_attributes

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs):
        """`ProcessorMixin.from_pretrained`, except that a sub-processor saved as absent (null in
        processor_config.json: a model without that encoder) is not looked for.

        The mixin's own loader looks for every sub-processor named in `__init__` and, since transformers 5.25, fails
        on an absent one; how it does so is private and changed between releases. So a folder with an absent
        sub-processor is loaded here through public calls only: `get_processor_dict`, the Auto classes, `cls(...)`.
        """
        processor_dict, _ = cls.get_processor_dict(pretrained_model_name_or_path, **dict(kwargs))
        absent = {name for name in OPTIONAL_SUB_PROCESSORS if name in processor_dict and processor_dict[name] is None}
        if not absent:
            return super().from_pretrained(pretrained_model_name_or_path, **kwargs)
        settings = [name for name in inspect.signature(cls.__init__).parameters
                    if name not in ("self", "kwargs", "tokenizer", *OPTIONAL_SUB_PROCESSORS)]
        overrides = {name: kwargs.pop(name) for name in settings if name in kwargs}
        loaders = {"image_processor": AutoImageProcessor, "feature_extractor": AutoFeatureExtractor}
        sub_processors = {name: None if name in absent else loader.from_pretrained(pretrained_model_name_or_path, **kwargs)
                          for name, loader in loaders.items()}
        tokenizer = AutoTokenizer.from_pretrained(pretrained_model_name_or_path, **kwargs)
        saved = {name: processor_dict[name] for name in settings if name in processor_dict}
        return cls(tokenizer=tokenizer, **sub_processors, **{**saved, **overrides})

    @property
    def model_input_names(self) -> list[str]:
        return ["input_ids", "attention_mask", "modality_ids", "position_ids", "labels", "pixel_values",
                "pixel_values_videos", "audio_features", "audio_chunk_counts", "audio_token_counts"]

    # ------------------------------------------------------------------ chat template
    def apply_chat_template(self, conversation, chat_template=None, add_generation_prompt=False, tokenize=False,
                            return_dict=False, **kwargs):
        """Render with the ChatML template (tokenize=False), or with tokenize=True run `__call__` on the conversation,
        taking media from the parts themselves (`{"type": "image", "image": PIL}`, `"video": frames`,
        `"audio": array`)."""
        if not tokenize:
            return super().apply_chat_template(conversation, chat_template=chat_template,
                                               add_generation_prompt=add_generation_prompt, **kwargs)
        batched = bool(conversation) and isinstance(conversation[0], (list, tuple))
        conversations = conversation if batched else [conversation]
        media: dict[str, list] = {m: [] for m in MEDIA_TYPES}
        for conv in conversations:
            for message in conv:
                if not isinstance(message.get("content"), str):
                    for part in message.get("content", []):
                        if isinstance(part, dict) and part.get("type") in media:
                            if part.get(part["type"]) is None:
                                raise ValueError(f"apply_chat_template(tokenize=True): a {part['type']} part needs "
                                                 f"its media under the key {part['type']!r}")
                            media[part["type"]].append(part[part["type"]])
        out = self(conversations, images=media["image"] or None, videos=media["video"] or None,
                   audios=media["audio"] or None, add_generation_prompt=add_generation_prompt,
                   return_labels=not add_generation_prompt, padding_side="left" if add_generation_prompt else "right")
        if return_dict:
            return out
        return out["input_ids"] if batched else out["input_ids"][0]

    # ------------------------------------------------------------------ main entry
    def __call__(self, conversations, images=None, videos=None, audios=None, video_fps=None,
                 add_generation_prompt=False, return_labels=True, padding_side="right") -> BatchFeature:
        if padding_side not in ("right", "left"):
            raise ValueError(f"padding_side must be 'right' or 'left', got {padding_side!r}")
        if not conversations:
            raise ValueError("OmniMoeProcessor: no conversations given")
        if isinstance(conversations[0], dict):
            conversations = [conversations]  # one conversation given unbatched
        given = {"image": list(images or []), "video": list(videos or []), "audio": list(audios or [])}
        per_sample = [count_media_parts(conv, i) for i, conv in enumerate(conversations)]
        for medium in MEDIA_TYPES:
            wanted = sum(c[medium] for c in per_sample)
            if wanted != len(given[medium]):
                detail = ", ".join(f"sample {i}: {c[medium]}" for i, c in enumerate(per_sample) if c[medium])
                raise ValueError(
                    f"{wanted} {medium} part(s) in the conversations ({detail or 'none'}) but "
                    f"{len(given[medium])} {medium}(s) given"
                )
            if given[medium] and medium not in self.modalities:
                raise ValueError(f"{medium} inputs given but this processor's modalities are {self.modalities}")

        data: dict[str, Any] = {}
        layouts: dict[str, list[dict]] = {}
        if given["image"]:
            data["pixel_values"], layouts["image"] = self._process_images(given["image"])
        if given["video"]:
            data["pixel_values_videos"], layouts["video"] = self._process_videos(given["video"], video_fps)
        if given["audio"]:
            audio_features, layouts["audio"] = self._process_audios(given["audio"])
            data["audio_features"] = audio_features
            data["audio_chunk_counts"] = torch.tensor([a["chunks"] for a in layouts["audio"]], dtype=torch.long)
            data["audio_token_counts"] = torch.tensor([a["count"] for a in layouts["audio"]], dtype=torch.long)

        cursor = dict.fromkeys(MEDIA_TYPES, 0)  # media are consumed in part order across the batch
        pieces = [layout_conversation(conv, add_generation_prompt, cursor) for conv in conversations]
        samples = tokenize_layouts(self.tokenizer, self.modalities, pieces, layouts)
        data.update(pad_samples(samples, self.tokenizer, self.positions_per_second, self.max_length, padding_side,
                                return_labels))
        return BatchFeature(data)

    # ------------------------------------------------------------------ media
    def _process_images(self, images: list) -> tuple[torch.Tensor, list[dict]]:
        if self.image_processor is None or self.image_size is None:
            raise ValueError("images given but this processor has no image processor / vision settings")
        pixels = self._pixels(images, "image")
        h, w = image_token_grid(self._count_config)
        count = image_token_count(self._count_config)
        return pixels, [{"count": count, "grid": (1, h, w), "seconds_per_t": 0.0}] * len(images)

    def _process_videos(self, videos: list, video_fps) -> tuple[torch.Tensor, list[dict]]:
        if self.image_processor is None or self.image_size is None:
            raise ValueError("videos given but this processor has no image processor / vision settings")
        if video_fps is None or isinstance(video_fps, (int, float)):
            fps_list = [float(video_fps if video_fps is not None else self.video_fps)] * len(videos)
        else:
            fps_list = [float(f) for f in video_fps]
            if len(fps_list) != len(videos):
                raise ValueError(f"video_fps has {len(fps_list)} entries for {len(videos)} videos")
        frames_per_video = self.video_num_frames
        flat, layouts = [], []
        t, h, w = video_token_grid(self._count_config, frames_per_video)
        count = video_token_count(self._count_config, frames_per_video)
        for v, (frames, fps) in enumerate(zip(videos, fps_list)):
            frames = list(frames)
            if not frames:
                raise ValueError(f"video {v} has 0 frames")
            if fps <= 0:
                raise ValueError(f"video {v}: fps must be > 0, got {fps}")
            # Uniform sampling over the clip; a clip shorter than video_num_frames repeats frames (pads).
            picks = np.linspace(0, len(frames) - 1, frames_per_video).round().astype(int)
            flat.extend(frames[i] for i in picks)
            # The clip lasts len(frames)/fps seconds whatever the sampling; each temporal token covers 1/t of it.
            layouts.append({"count": count, "grid": (t, h, w), "seconds_per_t": len(frames) / (fps * t)})
        pixels = self._pixels(flat, "video frame")
        return pixels.reshape(len(videos), frames_per_video, *pixels.shape[1:]), layouts

    def _pixels(self, images: list, what: str) -> torch.Tensor:
        pixels = self.image_processor(images=images, return_tensors="pt")["pixel_values"]
        size = self.image_size if isinstance(self.image_size, (list, tuple)) else (self.image_size, self.image_size)
        if tuple(pixels.shape[-2:]) != tuple(size):
            raise ValueError(
                f"the image processor makes {what}s of {tuple(pixels.shape[-2:])} pixels but the vision encoder "
                f"takes {tuple(size)}: token counts would not match"
            )
        return pixels

    def _process_audios(self, audios: list) -> tuple[torch.Tensor, list[dict]]:
        extractor = self.feature_extractor
        if extractor is None or self.audio_max_source_positions is None:
            raise ValueError("audios given but this processor has no feature extractor / audio settings")
        hop, rate = extractor.hop_length, extractor.sampling_rate
        frames_per_chunk = 2 * self.audio_max_source_positions
        samples_per_chunk = frames_per_chunk * hop
        chunks, layouts = [], []
        seconds_per_token = audio_seconds_per_token(self._count_config, hop_length=hop, sampling_rate=rate)
        for a, clip in enumerate(audios):
            clip = np.asarray(clip, dtype=np.float32)
            if clip.ndim != 1 or clip.size == 0:
                raise ValueError(f"audio {a}: expected a non-empty 1-D (mono) array, got shape {clip.shape}")
            n_chunks = audio_chunk_count(self._count_config, clip.size, hop_length=hop)
            count = audio_token_count(self._count_config, clip.size, sampling_rate=rate, hop_length=hop)
            chunks.extend(clip[i * samples_per_chunk : (i + 1) * samples_per_chunk] for i in range(n_chunks))
            layouts.append({"count": count, "chunks": n_chunks, "grid": (count, 1, 1), "seconds_per_t": seconds_per_token})
        features = extractor(chunks, sampling_rate=rate, padding="max_length", max_length=samples_per_chunk,
                             truncation=True, return_tensors="np")["input_features"]
        if features.shape[1:] != (self.audio_num_mel_bins, frames_per_chunk):
            raise ValueError(
                f"the feature extractor makes chunks of {features.shape[1:]} (mels, frames) but the audio encoder "
                f"takes {(self.audio_num_mel_bins, frames_per_chunk)}"
            )
        return torch.from_numpy(np.ascontiguousarray(features)), layouts

    # The conversation layout without media, for measuring a sample's length (data/collate.py) the way `__call__`
    # lays it out.
    _layout = staticmethod(layout_conversation)


def _default_image_processor(vision_model_type: str, image_size: int):
    from transformers import CLIPImageProcessorPil, SiglipImageProcessorPil

    if vision_model_type == "siglip_vision_model":
        return SiglipImageProcessorPil(size={"height": image_size, "width": image_size})
    return CLIPImageProcessorPil(size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size})


def _default_feature_extractor(num_mel_bins: int, frames_per_chunk: int, hop_length: int = 160, sampling_rate: int = 16000):
    from transformers import WhisperFeatureExtractor

    seconds = frames_per_chunk * hop_length / sampling_rate
    return WhisperFeatureExtractor(feature_size=num_mel_bins, sampling_rate=sampling_rate, hop_length=hop_length,
                                   chunk_length=int(seconds) if float(seconds).is_integer() else seconds)


__all__ = ["OmniMoeProcessor", "count_media_parts", "IGNORE_INDEX"]

OmniMoeProcessor.register_for_auto_class("AutoProcessor")
