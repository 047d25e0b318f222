"""`ResumableLoader`: a torch DataLoader over a `ShardDataset` whose position is a state dict.

Why resuming is exact: each worker's raw stream is a pure function of (seed, epoch, rank, worker);
every batch carries the raw position its worker reached and that worker's drop counters, and
the loader records them when the batch is *delivered* (prefetched batches do not count). The
DataLoader serves workers round-robin (skipping exhausted ones), so after restoring, the
DataLoader's first worker is made to play the logical worker whose batch was due next; each
worker skips its offset before decoding. The batches after `load_state_dict` are then those
the uninterrupted run would have produced, for any `num_workers` (it must not change across
the resume). Workers are created per epoch (no persistent workers) so they see the new plan.

Batches are formed by a batching strategy (`omni_moe.data.batching`: fixed size, modality-grouped, token
budget, packed rows). A strategy with a look-ahead buffer also reports the raw positions still
buffered when a batch leaves; they are part of the position, re-read on resume, so the buffer
is rebuilt exactly.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from torch.utils.data import DataLoader, IterableDataset

from .batching import BatchingStrategy, FixedSizeBatching, iter_batches
from .quality import DropCounters
from .reader import ResumePlan, ShardDataset

STATE_VERSION = 1


@dataclass
class _TaggedBatch:
    batch: Any
    worker: int
    position: int
    counters: dict
    empty: bool = False  # no batch: only reports trailing drops / a dropped partial batch
    pending: tuple[int, ...] = ()  # raw positions still in the worker's batching buffer


class _Batcher(IterableDataset):
    """Runs in each worker: groups `Tagged` samples into collated batches with the batching strategy."""

    def __init__(self, dataset: ShardDataset, batching: BatchingStrategy, collate_fn: Callable, drop_last: bool):
        super().__init__()
        self.dataset, self.batching, self.collate_fn, self.drop_last = dataset, batching, collate_fn, drop_last

    def __iter__(self) -> Iterator[_TaggedBatch]:
        for out in iter_batches(self.dataset.iter_tagged(), self.batching, self.drop_last):
            if out.items is None:
                yield _TaggedBatch(None, out.worker, out.position, out.counters, empty=True)
            else:
                yield _TaggedBatch(self.collate_fn(out.items), out.worker, out.position, out.counters,
                                   pending=out.pending)


def list_collate(samples: list) -> list:
    """Default collate: the list of samples (decoded media are PIL images/arrays, not stackable)."""
    return samples


class ResumableLoader:
    """Iterate one epoch per `for` loop; `state_dict()`/`load_state_dict()` capture the position.

    `collate_fn(list_of_transformed_samples) -> batch` runs in the workers (a packed strategy hands it
    a list of rows, each a list of samples). Give `batch_size` (fixed-size batches) or `batching`
    (a `omni_moe.data.batching` strategy). `max_batches_per_epoch` gives a fixed-length epoch (e.g. the
    smallest rank's batch count, so ranks stay in step).
    """

    def __init__(self, dataset: ShardDataset, *, batch_size: int | None = None,
                 batching: BatchingStrategy | None = None, collate_fn: Callable | None = None,
                 num_workers: int = 0, drop_last: bool = False, max_batches_per_epoch: int | None = None,
                 prefetch_factor: int | None = None, multiprocessing_context: Any = None, timeout: float = 0):
        if (batch_size is None) == (batching is None):
            raise ValueError("give exactly one of batch_size (fixed-size batches) or batching (a strategy)")
        if batching is None:
            if batch_size < 1:
                raise ValueError(f"batch_size must be >= 1, got {batch_size}")
            batching = FixedSizeBatching(batch_size)
        self.dataset = dataset
        self.batching = batching
        self.batch_size = getattr(batching, "batch_size", None)
        self.collate_fn, self.drop_last = collate_fn or list_collate, drop_last
        self.num_workers = num_workers
        self.max_batches_per_epoch = max_batches_per_epoch
        self._loader_kwargs = {"timeout": timeout, "multiprocessing_context": multiprocessing_context}
        if num_workers > 0 and prefetch_factor is not None:
            self._loader_kwargs["prefetch_factor"] = prefetch_factor
        self._logical_workers = max(1, num_workers)
        dataset.check_slots(num_workers)
        self._reset_epoch(0)
        self._finished_counters = DropCounters()

    # --- position ---------------------------------------------------------------------------
    def _reset_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self._batches = 0          # batches delivered in this epoch
        self._next_worker = 0      # logical worker whose batch the DataLoader serves next
        self._offsets: dict[int, int] = {}
        self._pending: dict[int, list[int]] = {}
        self._worker_counters: dict[int, dict] = {}

    def set_epoch(self, epoch: int) -> None:
        """Start `epoch` from its beginning (drops a mid-epoch position)."""
        self._reset_epoch(epoch)

    @property
    def counters(self) -> DropCounters:
        """Drop counters over everything delivered so far (all epochs, all workers of this rank)."""
        total = self._finished_counters
        for state in self._worker_counters.values():
            total = total.merge(DropCounters.from_state_dict(state))
        return total

    def state_dict(self) -> dict:
        return {
            "version": STATE_VERSION,
            "epoch": self.epoch,
            "batches_in_epoch": self._batches,
            "next_worker": self._next_worker,
            "offsets": {str(w): n for w, n in sorted(self._offsets.items())},
            "pending": {str(w): list(p) for w, p in sorted(self._pending.items()) if p},
            "worker_counters": {str(w): c for w, c in sorted(self._worker_counters.items())},
            "finished_counters": self._finished_counters.state_dict(),
            "rank": self.dataset.rank,
            "world_size": self.dataset.world_size,
            "num_workers": self.num_workers,
            "seed": self.dataset.seed,
            "dataset": self.dataset.fingerprint(),
            "batching": self.batching.describe(),
        }

    def load_state_dict(self, state: dict) -> None:
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"data loader state version {state.get('version')!r} is not {STATE_VERSION}")
        expected = {"rank": self.dataset.rank, "world_size": self.dataset.world_size, "num_workers": self.num_workers,
                    "seed": self.dataset.seed, "dataset": self.dataset.fingerprint()}
        changed = {k: (state[k], v) for k, v in expected.items() if state[k] != v}
        if changed:
            detail = ", ".join(f"{k}: saved {old} != now {new}" for k, (old, new) in changed.items())
            raise ValueError(f"cannot resume the data position exactly: {detail}")
        # States saved before batching strategies existed used fixed-size batches and no buffer.
        saved_batching = state.get("batching", {"strategy": "mixed", "batch_size": self.batch_size})
        if saved_batching != self.batching.describe():
            raise ValueError(f"cannot resume the data position exactly: batching: saved {saved_batching} != now "
                             f"{self.batching.describe()}")
        self._reset_epoch(int(state["epoch"]))
        self._batches = int(state["batches_in_epoch"])
        self._next_worker = int(state["next_worker"])
        self._offsets = {int(w): int(n) for w, n in state["offsets"].items()}
        self._pending = {int(w): [int(p) for p in ps] for w, ps in state.get("pending", {}).items()}
        self._worker_counters = {int(w): dict(c) for w, c in state["worker_counters"].items()}
        self._finished_counters = DropCounters.from_state_dict(state["finished_counters"])

    # --- iteration ----------------------------------------------------------------------------
    def __iter__(self) -> Iterator[Any]:
        if self.max_batches_per_epoch is not None and self._batches >= self.max_batches_per_epoch:
            self._end_epoch()
        self.dataset.plan = ResumePlan(epoch=self.epoch, rotation=self._next_worker, offsets=dict(self._offsets),
                                       counters=dict(self._worker_counters),
                                       pending={w: list(p) for w, p in self._pending.items()})
        loader = DataLoader(_Batcher(self.dataset, self.batching, self.collate_fn, self.drop_last),
                            batch_size=None, num_workers=self.num_workers, **self._loader_kwargs)
        iterator = iter(loader)
        try:
            for tagged in iterator:
                self._offsets[tagged.worker] = tagged.position
                self._pending[tagged.worker] = list(tagged.pending)
                self._worker_counters[tagged.worker] = tagged.counters
                self._next_worker = (tagged.worker + 1) % self._logical_workers
                if tagged.empty:
                    continue
                self._batches += 1
                yield tagged.batch
                if self.max_batches_per_epoch is not None and self._batches >= self.max_batches_per_epoch:
                    break
        finally:
            # Stop the workers now when the epoch ends early or a worker raised. Left to the garbage
            # collector (the exception's traceback keeps the iterator in a reference cycle), the
            # shutdown runs after the worker queues were finalised and each join waits out its 5 s timeout.
            shutdown = getattr(iterator, "_shutdown_workers", None)
            if shutdown is not None:
                shutdown()
        self._end_epoch()

    def _end_epoch(self) -> None:
        self._finished_counters = self.counters
        self._reset_epoch(self.epoch + 1)
