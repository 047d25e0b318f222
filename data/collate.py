"""`OmniCollator`: decoded samples -> one model batch (tensors) and the counts the training loop logs.

The samples of a batch go through the processor in ONE call (`to_processor_messages` turns the
canonical `<image>`/`<video>`/`<audio>` markers into media parts; media lists are concatenated in
sample order, which is the placeholder order the model consumes them in). Two layouts:

* padded (a list of samples): one row per sample, right-padded, `attention_mask` [B, T];
* packed (a list of rows, each a list of samples, from `PackedBatching`): the samples of a row are
  concatenated; `attention_mask` is a 4-D boolean [R, 1, T, T] block-diagonal causal mask (a token
  sees only earlier tokens of its own sample), the 3D position ids restart at every sample, and the
  first label of every sample is ignored, so no loss term predicts one sample from another.

Labels: the processor labels assistant turns only, and the canonical schema rejects a conversation
without non-empty assistant content, so every sample carries labels; the collator never truncates
(an over-long sample is rejected by `measure` at read time, counted under `too_long`). A sample that
still reaches the collator without any label raises, naming it.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass

import numpy as np
import torch

from omni_moe.modeling.media import audio_token_count, image_token_count, video_token_count
from omni_moe.modeling.processing_omni import IGNORE_INDEX

from .quality import TOO_LONG, SampleRejected
from .schema import MEDIA_KINDS, strip_media, to_processor_messages

MEDIA_INPUTS = ("pixel_values", "pixel_values_videos", "audio_features", "audio_chunk_counts", "audio_token_counts")


@dataclass
class OmniBatch:
    """`model(**batch.inputs)`; the rest is for logging and loss bookkeeping (never a model input)."""

    inputs: dict[str, torch.Tensor]
    sample_ids: list[str]
    num_tokens: int  # real (non-padding) tokens
    num_padded_tokens: int  # rows x columns: what the step computes
    num_label_tokens: int  # targets the loss averages over (labels[:, 1:] != -100)
    modality_samples: dict[str, int]  # samples per meta.modality
    modality_tokens: dict[str, int]  # real tokens per modality id (text, image, ...)
    segment_ids: torch.Tensor | None = None  # packed: [R, T], k = k-th sample of the row (from 1), 0 = padding

    @property
    def num_samples(self) -> int:
        return len(self.sample_ids)

    @property
    def packed(self) -> bool:
        return self.segment_ids is not None

    def to(self, device: torch.device | str) -> OmniBatch:
        moved = {k: v.to(device) for k, v in self.inputs.items()}
        segments = self.segment_ids.to(device) if self.segment_ids is not None else None
        return OmniBatch(moved, self.sample_ids, self.num_tokens, self.num_padded_tokens, self.num_label_tokens,
                         self.modality_samples, self.modality_tokens, segments)

    def __reduce__(self):
        # DataLoader workers send batches through torch's ForkingPickler, which gives every tensor its own
        # shared-memory segment: measured ~5 ms per batch of a dozen small tensors (dump + load), a third of
        # collating 16 synthetic samples. Small tensors travel inside the pickle as numpy arrays instead (~0.1
        # ms); large ones (real images) keep the shared-memory path.
        inputs = {k: _inline(v) for k, v in self.inputs.items()}
        segments = _inline(self.segment_ids) if self.segment_ids is not None else None
        return (_rebuild_batch, (inputs, self.sample_ids, self.num_tokens, self.num_padded_tokens,
                                 self.num_label_tokens, self.modality_samples, self.modality_tokens, segments))


INLINE_TENSOR_BYTES = 1 << 18


def _inline(tensor: torch.Tensor):
    small = tensor.device.type == "cpu" and tensor.numel() * tensor.element_size() < INLINE_TENSOR_BYTES
    return tensor.numpy() if small and not tensor.requires_grad else tensor


def _restore(value) -> torch.Tensor:
    return torch.from_numpy(value) if isinstance(value, np.ndarray) else value


def _rebuild_batch(inputs, *fields) -> OmniBatch:
    *counts, segments = fields
    return OmniBatch({k: _restore(v) for k, v in inputs.items()}, *counts,
                     segment_ids=_restore(segments) if segments is not None else None)


def _sample_id(sample: dict) -> str:
    return str(sample.get("id", "?"))


class OmniCollator:
    """Decoded samples (dicts from `ShardDataset`) -> `OmniBatch`. Picklable: runs in DataLoader workers.

    `max_length`: the longest sample (padded) or packed row allowed; `pad_to_multiple_of`: round the
    sequence dimension up (fewer distinct shapes for kernels and compilers); `strip_media`: learn from the text
    alone (media dropped, each marker replaced by the sample's `meta.media_text` description when it has one:
    `omni_moe.data.schema.strip_media`), e.g. for a text-only LLM.
    """

    def __init__(self, processor, max_length: int | None = None, pad_to_multiple_of: int | None = None,
                 strip_media: bool = False):
        if max_length is not None and max_length < 1:
            raise ValueError(f"max_length must be >= 1, got {max_length}")
        if pad_to_multiple_of is not None and pad_to_multiple_of < 1:
            raise ValueError(f"pad_to_multiple_of must be >= 1, got {pad_to_multiple_of}")
        self.processor = processor
        self.max_length = max_length
        self.pad_to_multiple_of = pad_to_multiple_of
        self.strip_media = strip_media
        tokenizer = processor.tokenizer
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self.modalities = list(processor.modalities)

    # ------------------------------------------------------------------ lengths
    def sequence_length(self, sample: dict) -> int:
        """The exact number of tokens the processor makes of `sample`, without processing any media.

        Media token counts come from `omni_moe.modeling.media`'s counting functions (the ones the processor and the
        model share). The text is laid out by the processor's own `_layout` and, as the processor does,
        adjacent text pieces are tokenized as one run (BPE merges across pieces must match), special
        strings split. About 0.1 ms a sample against ~1 ms for a processor call (`omni.benchmarks.data`);
        the collator re-checks every measured length against the processor's output.
        """
        processor = self.processor
        counts = processor._count_config  # the processor's own count settings (image size, pooling, ...)
        media = 0
        if sample.get("images"):
            media += image_token_count(counts) * len(sample["images"])
        if sample.get("videos"):
            media += video_token_count(counts, processor.video_num_frames) * len(sample["videos"])
        if sample.get("audios"):
            extractor = processor.feature_extractor
            if extractor is None:
                raise ValueError(f"sample {_sample_id(sample)!r} has audio but the processor has no feature extractor")
            media += sum(audio_token_count(counts, len(clip), sampling_rate=extractor.sampling_rate,
                                           hop_length=extractor.hop_length) for clip in sample["audios"])
        pieces = processor._layout(to_processor_messages(sample["messages"]), False, dict.fromkeys(MEDIA_KINDS, 0))
        runs, text, specials = [], "", 0
        for piece in pieces:
            if piece.kind == "text":
                text += piece.text
                continue
            if text:
                runs.append(text)
                text = ""
            specials += piece.kind == "special"  # media pieces are counted above
        if text:
            runs.append(text)
        encoded = processor.tokenizer(runs, add_special_tokens=False, split_special_tokens=True)["input_ids"]
        return media + specials + sum(len(ids) for ids in encoded)

    def measure(self, sample: dict) -> dict:
        """Reader transform: the sample with `num_tokens` set (exact); rejects it as `too_long` above max_length.

        `ShardDataset(..., transform=collator.measure)`: the rejection is counted by the reader's drop
        policy like any bad sample, and the length is what length-aware batching strategies read.
        """
        if self.strip_media:
            sample = strip_media(sample)
        length = self.sequence_length(sample)
        if self.max_length is not None and length > self.max_length:
            raise SampleRejected(TOO_LONG, f"{length} tokens after processing > max_length {self.max_length}")
        return {**sample, "num_tokens": length}

    # ------------------------------------------------------------------ collation
    def __call__(self, batch: list) -> OmniBatch:
        if not batch:
            raise ValueError("OmniCollator: empty batch")
        if isinstance(batch[0], (list, tuple)):
            return self.collate_packed(batch)
        return self.collate(batch)

    def _process(self, samples: list[dict]):
        if self.strip_media:
            samples = [strip_media(s) for s in samples]
        conversations = [to_processor_messages(s["messages"]) for s in samples]
        images = [image for s in samples for image in s.get("images", [])]
        videos = [video for s in samples for video in s.get("videos", [])]
        audios = [audio for s in samples for audio in s.get("audios", [])]
        default_fps = self.processor.video_fps
        fps = [f if f is not None else default_fps for s in samples
               for f in (s.get("video_fps") or [None] * len(s.get("videos", [])))]
        try:
            return self.processor(conversations, images=images or None, videos=videos or None,
                                  audios=audios or None, video_fps=fps or None)
        except ValueError as exc:
            raise ValueError(f"processing the batch with samples {[_sample_id(s) for s in samples]} failed: {exc}") \
                from exc

    def _check_samples(self, samples: list[dict], lengths: list[int], labelled: list[int]) -> None:
        for sample, length, n_labels in zip(samples, lengths, labelled):
            expected = sample.get("num_tokens")
            if expected is not None and expected != length:
                raise ValueError(f"sample {_sample_id(sample)!r}: measured {expected} tokens but the processor made "
                                 f"{length} (OmniCollator.sequence_length is out of step with the processor)")
            if n_labels == 0:
                raise ValueError(f"sample {_sample_id(sample)!r}: no token carries a label (no assistant content "
                                 f"to learn); the schema validator should have rejected it")

    def collate(self, samples: list[dict]) -> OmniBatch:
        out = self._process(samples)
        mask = out["attention_mask"]
        lengths = mask.sum(1).tolist()
        labelled = (out["labels"] != IGNORE_INDEX).sum(1).tolist()
        self._check_samples(samples, lengths, labelled)
        if self.max_length is not None:
            for sample, length in zip(samples, lengths):
                if length > self.max_length:
                    raise ValueError(f"sample {_sample_id(sample)!r} has {length} tokens > max_length "
                                     f"{self.max_length}; drop such samples at read time with "
                                     f"ShardDataset(transform=collator.measure) (counted as too_long)")
        inputs = {k: out[k] for k in ("input_ids", "attention_mask", "modality_ids", "position_ids", "labels",
                                      "rope_deltas", *MEDIA_INPUTS) if k in out}
        self._pad_to_multiple(inputs)
        return self._batch(inputs, samples, real=inputs["attention_mask"].bool())

    def _pad_to_multiple(self, inputs: dict[str, torch.Tensor]) -> None:
        length = inputs["input_ids"].shape[1]
        target = self._padded_length(length)
        extra = target - length
        if extra == 0:
            return
        fills = {"input_ids": self.pad_id, "attention_mask": 0, "modality_ids": 0, "labels": IGNORE_INDEX}
        for name, value in fills.items():
            tensor = inputs[name]
            inputs[name] = torch.cat([tensor, tensor.new_full((tensor.shape[0], extra), value)], dim=1)
        positions = inputs["position_ids"]  # [3, B, T]: keep counting past the end (masked anyway)
        tail = positions[:, :, -1:] + 1 + torch.arange(extra)
        inputs["position_ids"] = torch.cat([positions, tail], dim=2)
        inputs["rope_deltas"] = inputs["rope_deltas"] - extra  # processor convention: delta - (T - length)

    def _padded_length(self, length: int) -> int:
        if self.pad_to_multiple_of is None:
            return length
        return math.ceil(length / self.pad_to_multiple_of) * self.pad_to_multiple_of

    def collate_packed(self, rows: list[list[dict]]) -> OmniBatch:
        samples = [s for row in rows for s in row]  # row-major = placeholder order of the packed batch
        if any(not row for row in rows):
            raise ValueError("OmniCollator: a packed row is empty")
        out = self._process(samples)
        lengths = out["attention_mask"].sum(1).tolist()
        labelled = (out["labels"] != IGNORE_INDEX).sum(1).tolist()
        self._check_samples(samples, lengths, labelled)
        row_lengths, start = [], 0
        for row in rows:
            row_lengths.append(sum(lengths[start:start + len(row)]))
            start += len(row)
        if self.max_length is not None:
            for row, row_length in zip(rows, row_lengths):
                if row_length > self.max_length:
                    raise ValueError(f"packed row {[_sample_id(s) for s in row]} has {row_length} tokens > "
                                     f"max_length {self.max_length}")
        width = self._padded_length(max(row_lengths))
        shape = (len(rows), width)
        input_ids = torch.full(shape, self.pad_id, dtype=torch.long)
        modality_ids = torch.zeros(shape, dtype=torch.long)
        labels = torch.full(shape, IGNORE_INDEX, dtype=torch.long)
        segment_ids = torch.zeros(shape, dtype=torch.long)
        position_ids = torch.zeros((3, *shape), dtype=torch.long)
        index = 0
        for r, row in enumerate(rows):
            cursor = 0
            for k in range(len(row)):
                n = lengths[index]
                span = slice(cursor, cursor + n)
                input_ids[r, span] = out["input_ids"][index, :n]
                modality_ids[r, span] = out["modality_ids"][index, :n]
                labels[r, span] = out["labels"][index, :n]
                labels[r, cursor] = IGNORE_INDEX  # the previous sample's last token never predicts this one
                position_ids[:, r, span] = out["position_ids"][:, index, :n]  # each sample starts at 0
                segment_ids[r, span] = k + 1
                cursor += n
                index += 1
            if cursor < width:  # padding: keep counting (masked anyway)
                position_ids[:, r, cursor:] = position_ids[:, r, :cursor].max() + 1 + torch.arange(width - cursor)
        inputs = {"input_ids": input_ids, "attention_mask": block_causal_mask(segment_ids),
                  "modality_ids": modality_ids, "position_ids": position_ids, "labels": labels}
        inputs.update({k: out[k] for k in MEDIA_INPUTS if k in out})
        return self._batch(inputs, samples, real=segment_ids > 0, segment_ids=segment_ids)

    def _batch(self, inputs: dict[str, torch.Tensor], samples: list[dict], real: torch.Tensor,
               segment_ids: torch.Tensor | None = None) -> OmniBatch:
        modality_ids = inputs["modality_ids"][real]
        per_modality = torch.bincount(modality_ids, minlength=len(self.modalities)).tolist()
        return OmniBatch(
            inputs=inputs,
            sample_ids=[_sample_id(s) for s in samples],
            num_tokens=int(real.sum()),
            num_padded_tokens=int(real.numel()),
            num_label_tokens=int((inputs["labels"][:, 1:] != IGNORE_INDEX).sum()),
            modality_samples=dict(Counter((s.get("meta") or {}).get("modality", "text") for s in samples)),
            modality_tokens={name: int(n) for name, n in zip(self.modalities, per_modality)},
            segment_ids=segment_ids,
        )


def block_causal_mask(segment_ids: torch.Tensor) -> torch.Tensor:
    """[R, T] segment ids (0 = padding) -> boolean [R, 1, T, T]: query i sees key j iff j <= i in the same sample.

    A padding query sees only itself, so SDPA never gets a row with no key (NaN); no real token sees padding.
    """
    length = segment_ids.shape[1]
    position = torch.arange(length, device=segment_ids.device)
    causal = position[:, None] >= position[None, :]
    same = segment_ids[:, :, None] == segment_ids[:, None, :]
    mask = same & causal & (segment_ids[:, :, None] > 0)
    mask |= torch.eye(length, dtype=torch.bool, device=segment_ids.device)
    return mask[:, None]


__all__ = ["OmniCollator", "OmniBatch", "block_causal_mask"]
