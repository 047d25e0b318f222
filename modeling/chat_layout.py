"""A conversation's ChatML layout -> token ids, labels, modality ids and Omni 3D-RoPE positions (a padded batch).

The part of `OmniMoeProcessor` that needs no media: conversations are checked, laid out as pieces (text, the
structural special tokens, media placeholders) in the order `CHAT_TEMPLATE` renders them, the text runs tokenized
with special strings split (a user typing "<|im_start|>" gets ordinary byte-level tokens), each media part
expanded to its placeholder repeated as many times as the processor's media layout says, and the samples padded.
Labels cover the assistant turns only.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from .positions import MediaSpan, build_position_ids
from .tokenizer_utils import IM_END, IM_START, MEDIA_PLACEHOLDERS, PAD_TOKEN

IGNORE_INDEX = -100
ROLES = ("system", "user", "assistant")
MEDIA_TYPES = ("image", "video", "audio")
PART_TYPES = ("text", *MEDIA_TYPES)



def check_conversation(conversation: Any, sample_index: int | None = None) -> None:
    where = f"sample {sample_index}" if sample_index is not None else "conversation"
    if not isinstance(conversation, (list, tuple)):
        raise TypeError(f"{where}: a conversation must be a list of messages, got {type(conversation).__name__}")
    for m, message in enumerate(conversation):
        if not isinstance(message, dict) or "role" not in message or "content" not in message:
            raise ValueError(f"{where}, message {m}: expected a dict with 'role' and 'content', got {message!r:.80}")
        if message["role"] not in ROLES:
            raise ValueError(f"{where}, message {m}: unknown role {message['role']!r}; expected one of {ROLES}")
        content = message["content"]
        if isinstance(content, str):
            continue
        if not isinstance(content, (list, tuple)):
            raise TypeError(f"{where}, message {m}: content must be a str or a list of parts, got {type(content).__name__}")
        for p, part in enumerate(content):
            part_type = part.get("type") if isinstance(part, dict) else None
            if part_type not in PART_TYPES:
                raise ValueError(f"{where}, message {m}, part {p}: unknown part type {part_type!r}; expected one of {PART_TYPES}")
            if part_type == "text" and not isinstance(part.get("text"), str):
                raise ValueError(f"{where}, message {m}, part {p}: a text part needs a str 'text'")


def count_media_parts(conversation: list[dict], sample_index: int | None = None) -> dict[str, int]:
    """{"image": n, "video": n, "audio": n}: the media parts of one (validated) conversation."""
    check_conversation(conversation, sample_index)
    counts = dict.fromkeys(MEDIA_TYPES, 0)
    for message in conversation:
        if not isinstance(message["content"], str):
            for part in message["content"]:
                if part["type"] in counts:
                    counts[part["type"]] += 1
    return counts


@dataclass
class LayoutPiece:
    """One element of a sample's layout before tokenization."""

    kind: str  # "text" | "special" | "media"
    text: str = ""  # text pieces
    token: str = ""  # special pieces
    modality: str = ""  # media pieces
    index: int = -1  # media pieces: index into the batch's flat list of that medium
    trained: bool = False  # an assistant turn's content or closing <|im_end|>: carries labels
    after_video: bool = False  # an audio part directly after a video part (the video's soundtrack)


@dataclass
class TokenizedSample:
    """One sample's ids, labels, modality ids and media spans (for its positions), before padding."""

    ids: list[int] = field(default_factory=list)
    labels: list[int] = field(default_factory=list)
    modalities: list[int] = field(default_factory=list)
    spans: list[MediaSpan] = field(default_factory=list)


def layout_conversation(conversation: list[dict], add_generation_prompt: bool, cursor: dict[str, int]) -> list[LayoutPiece]:
    """ChatML pieces in the order CHAT_TEMPLATE renders them; media parts numbered across the batch."""
    pieces: list[LayoutPiece] = []
    for message in conversation:
        trained = message["role"] == "assistant"
        pieces += [LayoutPiece("special", token=IM_START), LayoutPiece("text", text=message["role"] + "\n")]
        content = message["content"]
        parts = [{"type": "text", "text": content}] if isinstance(content, str) else content
        previous = None
        for part in parts:
            if part["type"] == "text":
                pieces.append(LayoutPiece("text", text=part["text"], trained=trained))
            else:
                index = cursor[part["type"]]
                cursor[part["type"]] += 1
                pieces.append(LayoutPiece("media", modality=part["type"], index=index,
                                       after_video=part["type"] == "audio" and previous == "video"))
            previous = part["type"]
        pieces += [LayoutPiece("special", token=IM_END, trained=trained), LayoutPiece("text", text="\n")]
    if add_generation_prompt:
        pieces += [LayoutPiece("special", token=IM_START), LayoutPiece("text", text="assistant\n")]
    return pieces


def tokenize_layouts(tokenizer, modalities: list[str], layouts: list[list[LayoutPiece]],
                     media: dict[str, list[dict]]) -> list[TokenizedSample]:
    """Merge adjacent text pieces into runs (as the tokenizer sees the rendered template between special
    tokens), tokenize all runs in one call with special strings split, then insert special and media ids.

    `media[medium][i]` is the layout of the batch's i-th item of that medium: its placeholder `count`, its
    position `grid` and `seconds_per_t` (`OmniMoeProcessor` computes them); `modalities` gives modality ids."""
    runs: list[str] = []
    plans: list[list[tuple]] = []
    for pieces in layouts:
        plan, buffer, trained_ranges = [], "", []
        for piece in [*pieces, LayoutPiece("end")]:
            if piece.kind == "text":
                if piece.trained and piece.text:
                    trained_ranges.append((len(buffer), len(buffer) + len(piece.text)))
                buffer += piece.text
                continue
            if buffer:
                plan.append(("run", len(runs), trained_ranges))
                runs.append(buffer)
                buffer, trained_ranges = "", []
            if piece.kind != "end":
                plan.append(("piece", piece))
        plans.append(plan)

    encoded = tokenizer(runs, add_special_tokens=False, split_special_tokens=True,
                        return_offsets_mapping=True) if runs else {"input_ids": [], "offset_mapping": []}
    token_id = tokenizer.convert_tokens_to_ids
    samples = []
    for plan in plans:
        sample = TokenizedSample()
        for entry in plan:
            if entry[0] == "run":
                _, r, trained_ranges = entry
                ids = encoded["input_ids"][r]
                for tid, (start, end) in zip(ids, encoded["offset_mapping"][r]):
                    # A token overlapping assistant content is trained (a BPE merge may straddle the boundary).
                    trained = any(start < r_end and end > r_start for r_start, r_end in trained_ranges)
                    sample.labels.append(tid if trained else IGNORE_INDEX)
                sample.ids.extend(ids)
                sample.modalities.extend([0] * len(ids))
                continue
            piece = entry[1]
            if piece.kind == "special":
                tid = token_id(piece.token)
                sample.ids.append(tid)
                sample.labels.append(tid if piece.trained else IGNORE_INDEX)
                sample.modalities.append(0)
            else:
                item = media[piece.modality][piece.index]
                sample.spans.append(MediaSpan(start=len(sample.ids), modality=piece.modality, grid=tuple(item["grid"]),
                                              seconds_per_t=item["seconds_per_t"], align_with_previous=piece.after_video))
                sample.ids.extend([token_id(MEDIA_PLACEHOLDERS[piece.modality])] * item["count"])
                sample.labels.extend([IGNORE_INDEX] * item["count"])  # media tokens are inputs, never targets
                sample.modalities.extend([modalities.index(piece.modality)] * item["count"])
        samples.append(sample)
    return samples


def pad_samples(samples: list[TokenizedSample], tokenizer, positions_per_second: float, max_length: int | None,
                padding_side: str, return_labels: bool) -> dict[str, torch.Tensor]:
    """The samples as one batch, padded on `padding_side` with the tokenizer's pad id, with their 3D position ids
    and rope deltas; a sample longer than `max_length` is an error naming it."""
    lengths = [len(s.ids) for s in samples]
    if max_length is not None:
        for i, length in enumerate(lengths):
            if length > max_length:
                raise ValueError(f"sample {i} has {length} tokens, more than max_length={max_length}")
    batch, longest = len(samples), max(lengths)
    pad_id = tokenizer.pad_token_id
    if pad_id is None:
        pad_id = tokenizer.convert_tokens_to_ids(PAD_TOKEN)
    input_ids = torch.full((batch, longest), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((batch, longest), dtype=torch.long)
    modality_ids = torch.zeros((batch, longest), dtype=torch.long)
    labels = torch.full((batch, longest), IGNORE_INDEX, dtype=torch.long)
    position_ids = torch.zeros((3, batch, longest), dtype=torch.long)
    rope_deltas = torch.zeros(batch, dtype=torch.long)
    for b, (sample, length) in enumerate(zip(samples, lengths)):
        positions, delta = build_position_ids(length, sample.spans, positions_per_second)
        where = slice(0, length) if padding_side == "right" else slice(longest - length, longest)
        input_ids[b, where] = torch.tensor(sample.ids, dtype=torch.long)
        attention_mask[b, where] = 1
        modality_ids[b, where] = torch.tensor(sample.modalities, dtype=torch.long)
        labels[b, where] = torch.tensor(sample.labels, dtype=torch.long)
        position_ids[:, b, where] = positions
        if padding_side == "right" and length < longest:
            # Right padding continues the count so positions stay increasing (the values are masked anyway).
            position_ids[:, b, length:] = positions.max() + 1 + torch.arange(longest - length)
        # Qwen2-VL convention: the token at padded index i >= longest gets position i + rope_delta.
        rope_deltas[b] = int(delta) - (longest - length)
    out = {"input_ids": input_ids, "attention_mask": attention_mask, "modality_ids": modality_ids,
           "position_ids": position_ids, "rope_deltas": rope_deltas}
    if return_labels:
        out["labels"] = labels
    return out


__all__ = ["IGNORE_INDEX", "LayoutPiece", "TokenizedSample", "count_media_parts", "layout_conversation",
           "pad_samples", "tokenize_layouts"]
