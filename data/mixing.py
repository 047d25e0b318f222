"""Weighted mixing of several shard sets, deterministic and resumable.

Each reader slot (rank, worker) draws `samples_per_epoch / (ranks' workers)` raw samples per
epoch; every draw picks a source with probability proportional to its weight, from a generator
seeded by (seed, epoch, rank, worker). A source that runs out starts its next pass (a fresh
shard order and shuffle), so the weights are the real proportions of the mix and every sample of a
source is read once per pass. Everything stays a pure function of (seed, epoch, rank, worker), so
`ResumableLoader` resumes a mix exactly like a single dataset (the mixer's state is the raw
position it stores).
"""

from __future__ import annotations

import itertools
import math
import random
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

from .reader import ShardDataset, assign_shards, derive_seed, resolve_shards

_MIX_SALT = 0x6D1C  # separates the source-choice generator from the shuffles of the same slot


class MixedShardDataset(ShardDataset):
    """`ShardDataset` over several named shard sets mixed by `weights`; a fixed-length epoch of
    `samples_per_epoch` raw draws per rank (so every rank runs the same number of steps).

    Decoded samples carry `"source": name`. Other keyword arguments are those of `ShardDataset`.
    """

    def __init__(self, sources: Mapping[str, str | Path | Sequence[str | Path]], weights: Mapping[str, float], *,
                 samples_per_epoch: int, **kwargs):
        if set(sources) != set(weights):
            raise ValueError(f"weights {sorted(weights)} must name exactly the sources {sorted(sources)}")
        bad = {k: w for k, w in weights.items() if not (isinstance(w, (int, float)) and math.isfinite(w) and w > 0)}
        if bad:
            raise ValueError(f"mixing weights must be positive finite numbers, got {bad}")
        if samples_per_epoch < 1:
            raise ValueError(f"samples_per_epoch must be >= 1, got {samples_per_epoch}")
        self.source_names = sorted(sources)  # sorted: the mix must not depend on dict order
        self.source_shards = {name: resolve_shards(sources[name]) for name in self.source_names}
        self.weights = [float(weights[name]) for name in self.source_names]
        self.samples_per_epoch = samples_per_epoch
        super().__init__([s for name in self.source_names for s in self.source_shards[name]], **kwargs)

    def fingerprint_fields(self) -> dict:
        return {**super().fingerprint_fields(),
                "sources": {n: [Path(s).name for s in self.source_shards[n]] for n in self.source_names},
                "weights": self.weights, "samples_per_epoch": self.samples_per_epoch}

    def check_slots(self, num_workers: int) -> None:
        for name in self.source_names:
            try:
                assign_shards(self.source_shards[name], seed=0, epoch=0, rank=self.rank, world_size=self.world_size,
                              worker=0, num_workers=max(1, num_workers), shuffle=False)
            except ValueError as exc:
                raise ValueError(f"mixing source {name!r}: {exc}") from None

    def _warn_if_uneven(self, num_workers: int) -> None:
        pass  # fixed-length epoch: every slot draws the same number of samples

    def _raw_stream(self, worker: int, num_workers: int) -> Iterator[dict]:
        slots = num_workers  # samples_per_epoch is per rank
        quota = self.samples_per_epoch // slots + (1 if worker < self.samples_per_epoch % slots else 0)
        chooser = random.Random(derive_seed(self.seed, self.plan.epoch, self.rank, worker, _MIX_SALT))
        streams = {name: self._passes(i, name, worker, num_workers) for i, name in enumerate(self.source_names)}
        for _ in range(quota):
            name = chooser.choices(self.source_names, weights=self.weights)[0]
            raw = next(streams[name])
            raw["__source__"] = name
            yield raw

    def _passes(self, index: int, name: str, worker: int, num_workers: int) -> Iterator[dict]:
        for pass_number in itertools.count():
            seed = derive_seed(self.seed, index, self.plan.epoch, pass_number)
            empty = True
            for raw in self._shuffled_raw(self.source_shards[name], seed, 0, worker, num_workers):
                empty = False
                yield raw
            if empty:
                raise ValueError(f"mixing source {name!r} has no samples for rank {self.rank} worker {worker}")
