"""Batching strategies over one worker's sample stream, deterministic and exactly resumable.

A strategy sees a *buffer* of samples pulled from the stream (in stream order) and picks the next
batch from it with `select(buffer, final)`; `None` means "pull another sample first". Because
`select` is a pure function of the buffer's contents, the batcher's whole state at any delivered
batch is (raw position reached, raw positions still buffered): `ResumableLoader` stores both,
and on resume the reader re-decodes the buffered positions while it skips (`ResumePlan.pending`),
so the buffer, and every batch after it, is rebuilt exactly.

Strategies (`make_batching` builds one from recipe fields):

* `FixedSizeBatching` ("mixed"): `batch_size` consecutive samples, any modalities (no buffer).
* `ModalityGroupedBatching` ("modality_grouped"): batches of one `meta.modality` and one length
  bucket (Uni-MoE's group-by-modality-length), picked from a look-ahead buffer of `lookahead`
  samples. When the buffer is full and no group has `batch_size` samples, the group of the
  oldest sample goes out short, so no sample waits forever.
* `TokenBudgetBatching` ("token_budget"): batch x longest <= `max_tokens` (the padded tokens the
  step computes). When the buffer is full it is sorted by length and cut greedily into batches;
  the batch holding the oldest sample goes out. A single sample longer than `max_tokens` is
  emitted alone (filter such samples at read time with `OmniCollator.measure` and `max_length`,
  which counts them under `too_long`).
* `PackedBatching` (`packing=True`): rows of several samples, each row <= `max_length` tokens
  (first-fit decreasing over the buffer), `rows_per_batch` rows per batch; the collator turns a
  row into one sequence with block-diagonal causal attention.

Lengths come from `length_fn(sample)`; the default reads `sample["num_tokens"]`, which
`OmniCollator.measure` sets to the exact processor length.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

DEFAULT_BUCKETS = (32, 64, 128, 256, 512, 1024, 2048, 4096, 8192)
STRATEGIES = ("mixed", "modality_grouped", "token_budget")


def sample_num_tokens(sample: Any) -> int:
    """Default length function: the exact token count `OmniCollator.measure` stored on the sample."""
    try:
        return int(sample["num_tokens"])
    except (KeyError, TypeError):
        sample_id = sample.get("id", "?") if isinstance(sample, dict) else type(sample).__name__
        raise ValueError(
            f"sample {sample_id!r} has no 'num_tokens': length-aware batching needs exact lengths; build the reader "
            f"with ShardDataset(..., transform=collator.measure) or pass length_fn to the strategy") from None


def sample_modality(sample: Any) -> str:
    """Default modality function: the canonical `meta.modality` (set by the schema validator)."""
    return sample["meta"]["modality"]


@dataclass
class BufferedSample:
    position: int  # raw stream position of the sample (what a resume re-reads)
    item: Any
    length: int
    modality: str


@dataclass
class Selection:
    """The next batch: its samples, optionally laid out in packed rows; `partial` = an epoch's short leftover."""

    members: list[BufferedSample]
    rows: list[list[BufferedSample]] | None = None
    partial: bool = False

    def batch_items(self) -> list:
        """What the collate function receives: samples, or (packed) a list of rows of samples."""
        if self.rows is not None:
            return [[m.item for m in row] for row in self.rows]
        return [m.item for m in self.members]


@dataclass
class Emission:
    """One batch leaving a worker, tagged with what resuming after it needs."""

    items: list | None  # None: nothing to deliver, only the position/counters to record
    worker: int
    position: int
    pending: tuple[int, ...]
    counters: dict


class BatchingStrategy:
    """Base: subclasses implement `select`; `describe()` is stored with the loader position."""

    name = "base"
    needs_lengths = False
    needs_modality = False

    def __init__(self, length_fn: Callable[[Any], int] | None = None,
                 modality_fn: Callable[[Any], str] | None = None):
        self.length_fn = length_fn or sample_num_tokens
        self.modality_fn = modality_fn or sample_modality

    def buffered(self, position: int, item: Any) -> BufferedSample:
        length = int(self.length_fn(item)) if self.needs_lengths else 0
        modality = self.modality_fn(item) if self.needs_modality else ""
        return BufferedSample(position, item, length, modality)

    def select(self, buffer: list[BufferedSample], final: bool) -> Selection | None:
        raise NotImplementedError

    def describe(self) -> dict:
        raise NotImplementedError


def _positive(name: str, value: int | None) -> int:
    if value is None or int(value) < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


class FixedSizeBatching(BatchingStrategy):
    name = "mixed"

    def __init__(self, batch_size: int, **kw):
        super().__init__(**kw)
        self.batch_size = _positive("batch_size", batch_size)

    def select(self, buffer, final):
        if len(buffer) >= self.batch_size:
            return Selection(buffer[: self.batch_size])
        return Selection(list(buffer), partial=True) if final else None

    def describe(self):
        return {"strategy": self.name, "batch_size": self.batch_size}


class ModalityGroupedBatching(BatchingStrategy):
    name = "modality_grouped"
    needs_lengths = True
    needs_modality = True

    def __init__(self, batch_size: int, lookahead: int = 64, bucket_boundaries=DEFAULT_BUCKETS, **kw):
        super().__init__(**kw)
        self.batch_size = _positive("batch_size", batch_size)
        self.lookahead = _positive("lookahead", lookahead)
        if self.lookahead < self.batch_size:
            raise ValueError(f"lookahead ({lookahead}) must be >= batch_size ({batch_size}) to ever fill a group")
        self.bucket_boundaries = tuple(int(b) for b in bucket_boundaries)
        if list(self.bucket_boundaries) != sorted(set(self.bucket_boundaries)):
            raise ValueError(f"bucket_boundaries must be strictly increasing, got {bucket_boundaries}")

    def bucket(self, length: int) -> int:
        """Bucket b holds lengths in (boundaries[b-1], boundaries[b]]; the last one everything longer."""
        return bisect.bisect_left(self.bucket_boundaries, length)

    def group_key(self, entry: BufferedSample) -> tuple[str, int]:
        return entry.modality, self.bucket(entry.length)

    def select(self, buffer, final):
        groups: dict[tuple[str, int], list[BufferedSample]] = {}
        for entry in buffer:  # stream order: each group's first entry is its oldest
            groups.setdefault(self.group_key(entry), []).append(entry)
        full = [g for g in groups.values() if len(g) >= self.batch_size]
        if full:
            oldest_full = min(full, key=lambda g: g[0].position)
            return Selection(oldest_full[: self.batch_size])
        if final or len(buffer) >= self.lookahead:
            return Selection(groups[self.group_key(buffer[0])], partial=final)
        return None

    def describe(self):
        return {"strategy": self.name, "batch_size": self.batch_size, "lookahead": self.lookahead,
                "bucket_boundaries": list(self.bucket_boundaries)}


def _greedy_budget_cuts(entries: list[BufferedSample], max_tokens: int, max_batch_size: int | None):
    """Cut length-sorted entries into consecutive batches with (size x longest) <= max_tokens."""
    batches, current = [], []
    for entry in entries:
        size, longest = len(current) + 1, max([entry.length] + [e.length for e in current])
        fits = size * longest <= max_tokens and (max_batch_size is None or size <= max_batch_size)
        if current and not fits:
            batches.append(current)
            current = []
        current.append(entry)  # an over-budget sample alone still forms a batch
    if current:
        batches.append(current)
    return batches


class TokenBudgetBatching(BatchingStrategy):
    name = "token_budget"
    needs_lengths = True

    def __init__(self, max_tokens: int, lookahead: int = 64, max_batch_size: int | None = None, **kw):
        super().__init__(**kw)
        self.max_tokens = _positive("max_tokens", max_tokens)
        self.lookahead = _positive("lookahead", lookahead)
        self.max_batch_size = None if max_batch_size is None else _positive("max_batch_size", max_batch_size)

    def select(self, buffer, final):
        if not (final or len(buffer) >= self.lookahead):
            return None
        # Longest first, so the batch of short leftovers (cheap to pad) is the one that comes out short.
        by_length = sorted(buffer, key=lambda e: (-e.length, e.position))
        cuts = _greedy_budget_cuts(by_length, self.max_tokens, self.max_batch_size)
        oldest = buffer[0]  # the buffer is in stream order
        chosen = next(batch for batch in cuts if any(e is oldest for e in batch))
        return Selection(sorted(chosen, key=lambda e: e.position))

    def describe(self):
        return {"strategy": self.name, "max_tokens": self.max_tokens, "lookahead": self.lookahead,
                "max_batch_size": self.max_batch_size}


class PackedBatching(BatchingStrategy):
    """Rows of whole samples (never split), each <= max_length tokens; rows_per_batch rows a batch."""

    name = "packed"
    needs_lengths = True

    def __init__(self, max_length: int, rows_per_batch: int, lookahead: int = 64, **kw):
        super().__init__(**kw)
        self.max_length = _positive("max_length", max_length)
        self.rows_per_batch = _positive("rows_per_batch", rows_per_batch)
        self.lookahead = _positive("lookahead", lookahead)

    def pack_rows(self, entries: list[BufferedSample]) -> list[list[BufferedSample]]:
        """First-fit decreasing; rows ordered by their oldest sample, samples in stream order within a row."""
        rows: list[list[BufferedSample]] = []
        room: list[int] = []
        for entry in sorted(entries, key=lambda e: (-e.length, e.position)):
            if entry.length > self.max_length:
                raise ValueError(
                    f"sample {_sample_id(entry.item)!r} has {entry.length} tokens > packing max_length "
                    f"{self.max_length}; drop over-long samples at read time (OmniCollator(max_length=...).measure "
                    f"as the reader's transform counts them under 'too_long')")
            slot = next((r for r, free in enumerate(room) if entry.length <= free), None)
            if slot is None:
                rows.append([])
                room.append(self.max_length)
                slot = len(rows) - 1
            rows[slot].append(entry)
            room[slot] -= entry.length
        rows = [sorted(row, key=lambda e: e.position) for row in rows]
        return sorted(rows, key=lambda row: row[0].position)

    def select(self, buffer, final):
        if not (final or len(buffer) >= self.lookahead):
            return None
        rows = self.pack_rows(buffer)[: self.rows_per_batch]
        members = sorted((e for row in rows for e in row), key=lambda e: e.position)
        return Selection(members, rows=rows, partial=final and len(rows) < self.rows_per_batch)

    def describe(self):
        return {"strategy": self.name, "max_length": self.max_length, "rows_per_batch": self.rows_per_batch,
                "lookahead": self.lookahead}


def _sample_id(item: Any) -> str:
    return item.get("id", "?") if isinstance(item, dict) else "?"


def make_batching(strategy: str = "mixed", *, batch_size: int | None = None, max_tokens: int | None = None,
                  lookahead: int = 64, packing: bool = False, max_length: int | None = None,
                  bucket_boundaries=DEFAULT_BUCKETS, max_batch_size: int | None = None,
                  length_fn: Callable[[Any], int] | None = None) -> BatchingStrategy:
    """A strategy from recipe fields. With `packing`, rows of `max_length` tokens: `batch_size` rows per batch
    ("mixed"), or `max_tokens // max_length` rows ("token_budget")."""
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown batching strategy {strategy!r}; expected one of {STRATEGIES}")
    if packing:
        if max_length is None:
            raise ValueError("packing needs max_length (the length of a packed row)")
        if strategy == "modality_grouped":
            raise ValueError("packing mixes samples inside a row by length; it is not combined with "
                             "modality_grouped batching (use strategy 'mixed' or 'token_budget')")
        if strategy == "token_budget":
            rows = _positive("max_tokens", max_tokens) // _positive("max_length", max_length)
            if rows < 1:
                raise ValueError(f"max_tokens {max_tokens} < max_length {max_length}: not even one packed row fits")
        else:
            rows = _positive("batch_size", batch_size)
        return PackedBatching(max_length, rows, lookahead, length_fn=length_fn)
    if strategy == "mixed":
        return FixedSizeBatching(batch_size, length_fn=length_fn)
    if strategy == "modality_grouped":
        return ModalityGroupedBatching(batch_size, lookahead, bucket_boundaries, length_fn=length_fn)
    return TokenBudgetBatching(max_tokens, lookahead, max_batch_size, length_fn=length_fn)


@dataclass
class _Cursor:
    """Where the worker's stream stands: the last raw position pulled and the counters there."""

    worker: int = 0
    position: int = 0
    counters: dict = field(default_factory=dict)


def iter_batches(tagged: Iterable, strategy: BatchingStrategy, drop_last: bool = False) -> Iterator[Emission]:
    """Turn a reader's `Tagged` stream into batches with resume tags (runs inside each worker).

    Replayed samples (re-read on resume, `Tagged.replayed` set) rebuild the buffer before any
    decision; then the strategy continues exactly where the saved run stood. `drop_last` drops an
    epoch's short final batches (their positions still count as consumed).
    """
    buffer: list[BufferedSample] = []
    cursor = _Cursor()
    reported: tuple | None = None  # (position, counters) of the last emission
    replaying = False
    seen_any = False

    def drain(final: bool) -> Iterator[Emission]:
        nonlocal reported
        while buffer:
            selection = strategy.select(buffer, final)
            if selection is None:
                if final:
                    raise RuntimeError(f"batching strategy {strategy.name!r} left {len(buffer)} samples at epoch end")
                return
            chosen = {id(m) for m in selection.members}
            if not chosen:
                raise RuntimeError(f"batching strategy {strategy.name!r} selected an empty batch")
            buffer[:] = [e for e in buffer if id(e) not in chosen]
            if selection.partial and drop_last:
                continue  # its position is reported by a later batch or the end-of-stream report
            reported = (cursor.position, cursor.counters)
            yield Emission(selection.batch_items(), cursor.worker, cursor.position,
                           tuple(e.position for e in buffer), cursor.counters)

    for item in tagged:
        seen_any = True
        replayed = item.replayed
        if replaying and replayed is None:
            yield from drain(False)  # the saved run was mid-way through this drain
            replaying = False
        cursor = _Cursor(item.worker, item.position, item.counters)
        if item.drops_only:
            continue
        if replayed is not None:
            buffer.append(strategy.buffered(replayed, item.item))
            replaying = True
            continue
        buffer.append(strategy.buffered(item.position, item.item))
        yield from drain(False)
    if not seen_any:
        return
    if replaying:
        yield from drain(False)
    yield from drain(True)
    if reported != (cursor.position, cursor.counters):  # trailing drops or dropped leftovers: record the position
        yield Emission(None, cursor.worker, cursor.position, (), cursor.counters)


__all__ = [
    "BatchingStrategy", "FixedSizeBatching", "ModalityGroupedBatching", "TokenBudgetBatching", "PackedBatching",
    "BufferedSample", "Selection", "Emission", "make_batching", "iter_batches", "sample_num_tokens",
    "sample_modality", "DEFAULT_BUCKETS", "STRATEGIES",
]
