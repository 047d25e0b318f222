"""Omni 3D RoPE position ids: (time, height, width) for every token of a sequence with media spans.

Text tokens take the same id on all three rows, so a text-only sequence is plain 1-D RoPE. Image tokens spread
over h/w at one time id; video frames and audio tokens advance the time id with real time
(`positions_per_second`), so audio and video from the same second share time ids (Qwen2.5-Omni's TMRoPE idea).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

MODALITIES_WITH_SPANS = ("image", "video", "audio")


@dataclass
class MediaSpan:
    start: int  # index in the token sequence of the span's first token
    modality: str  # "image" | "video" | "audio"
    grid: tuple[int, int, int]  # (t, h, w) token grid; audio: (num_tokens, 1, 1)
    seconds_per_t: float = 0.0  # seconds between consecutive t steps (video: per pooled frame group; audio: per token)
    align_with_previous: bool = False  # time origin = the previous media span's (the audio track of a video)

    @property
    def num_tokens(self) -> int:
        t, h, w = self.grid
        return int(t) * int(h) * int(w)


def _check_span(span: MediaSpan, index: int, cursor: int, length: int) -> None:
    where = f"build_position_ids: span {index} ({span.modality} at {span.start})"
    if span.modality not in MODALITIES_WITH_SPANS:
        raise ValueError(f"{where}: modality must be one of {MODALITIES_WITH_SPANS}")
    if len(span.grid) != 3 or any(int(g) < 1 for g in span.grid):
        raise ValueError(f"{where}: grid must be three positive sizes (t, h, w), got {span.grid}")
    t, h, w = (int(g) for g in span.grid)
    if span.modality == "image" and t != 1:
        raise ValueError(f"{where}: an image grid has t = 1, got {span.grid}")
    if span.modality == "audio" and (h, w) != (1, 1):
        raise ValueError(f"{where}: an audio grid is (num_tokens, 1, 1), got {span.grid}")
    if span.modality != "image" and t > 1 and not span.seconds_per_t > 0:
        raise ValueError(f"{where}: seconds_per_t must be > 0 for time to advance, got {span.seconds_per_t}")
    if span.start < cursor:
        raise ValueError(f"{where}: spans must be sorted and must not overlap (previous span ends at {cursor})")
    if span.start + span.num_tokens > length:
        raise ValueError(f"{where}: {span.num_tokens} tokens run past the sequence length {length}")


def _span_ids(span: MediaSpan, origin: int, positions_per_second: float) -> torch.Tensor:
    """[3, t*h*w] ids of one span, tokens ordered t, then h, then w."""
    t, h, w = (int(g) for g in span.grid)
    if span.modality == "image":
        time_steps = torch.zeros(t, dtype=torch.long)
    else:
        # round() of real time in position units; python's round keeps this identical to the processor's math
        seconds = [i * span.seconds_per_t for i in range(t)]
        time_steps = torch.tensor([round(s * positions_per_second) for s in seconds], dtype=torch.long)
    if span.modality == "audio":
        return (origin + time_steps).expand(3, t)
    tt = time_steps.view(t, 1, 1).expand(t, h, w)
    hh = torch.arange(h).view(1, h, 1).expand(t, h, w)
    ww = torch.arange(w).view(1, 1, w).expand(t, h, w)
    return origin + torch.stack([tt, hh, ww]).reshape(3, -1)


def build_position_ids(length: int, spans: list[MediaSpan], positions_per_second: float) -> tuple[torch.Tensor, int]:
    """Position ids [3, length] (time, height, width) and rope_delta = (max position + 1) - length.

    A token generated at sequence index i >= length gets position i + rope_delta on all three rows.
    After a span the next text position is max(current, span max + 1): an aligned span that ends earlier in
    time than the span it aligns with never moves positions backwards.
    """
    if length < 0:
        raise ValueError(f"build_position_ids: length must be >= 0, got {length}")
    if positions_per_second <= 0:
        raise ValueError(f"build_position_ids: positions_per_second must be > 0, got {positions_per_second}")
    ids = torch.empty(3, length, dtype=torch.long)
    position = 0  # next text position
    cursor = 0  # next sequence index to fill
    previous_origin = None
    for index, span in enumerate(spans):
        _check_span(span, index, cursor, length)
        n_text = span.start - cursor
        ids[:, cursor : span.start] = torch.arange(position, position + n_text)
        position += n_text
        if span.align_with_previous:
            if previous_origin is None:
                raise ValueError(f"build_position_ids: span {index} aligns with a previous media span but is the first")
            origin = previous_origin
        else:
            origin = position
        span_ids = _span_ids(span, origin, positions_per_second)
        ids[:, span.start : span.start + span.num_tokens] = span_ids
        position = max(position, int(span_ids.max()) + 1)
        cursor = span.start + span.num_tokens
        previous_origin = origin
    ids[:, cursor:] = torch.arange(position, position + (length - cursor))
    position += length - cursor
    # `position` is one past the largest id used: every span and text run ends at or below it
    return ids, position - length


__all__ = ["MediaSpan", "build_position_ids"]
