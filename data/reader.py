"""Shard reader: an `IterableDataset` over webdataset tar shards.

Each epoch, one reader slot per (rank, dataloader worker) gets an explicit, disjoint set of
shards: the shard order is shuffled by (seed, epoch) identically on every rank and slot s takes
`order[s::ranks*workers]`, so each sample is read exactly once per epoch. Inside a slot the raw
samples (member bytes, nothing decoded) go through a shuffle buffer seeded by
(seed, epoch, rank, worker); the resulting per-slot stream is a pure function of those four
numbers. Resuming skips the first `offset` raw samples of that stream *before* decoding.

Then every sample is checked like the writer checks it (defence in depth: shards may come from
elsewhere) and decoded by our own code, never by webdataset's automatic decoders, so a pickle
member (`.pkl`, `.pth`, ...) is rejected and counted without ever being read as Python objects.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import webdataset as wds
from torch.utils.data import IterableDataset, get_worker_info
from webdataset.tariterators import group_by_keys, tar_file_expander

from .media import (
    AUDIO_EXTENSIONS,
    DEFAULT_AUDIO_RATE,
    DEFAULT_LIMITS,
    IMAGE_EXTENSIONS,
    PICKLE_EXTENSIONS,
    VIDEO_CONTAINER_EXTENSIONS,
    decode_audio,
    decode_image,
    decode_video_container,
    decode_video_frames,
    extension,
)
from .quality import (
    MALFORMED_JSON,
    MEDIA_TOO_LARGE,
    MISSING_MEDIA,
    NON_UTF8,
    PICKLE_MEMBER,
    RECORD_TOO_LARGE,
    SHARD_READ_ERROR,
    UNSUPPORTED_MEDIA,
    DropCounters,
    DropPolicy,
    SampleRejected,
)
from .schema import MAX_RECORD_BYTES, check_length, validate_sample
from .shards import load_index

logger = logging.getLogger(__name__)


def derive_seed(*parts: int) -> int:
    """A 64-bit seed from integers, identical in every process (unlike `hash()`)."""
    digest = hashlib.sha256("/".join(str(int(p)) for p in parts).encode("ascii")).digest()
    return int.from_bytes(digest[:8], "little")


def resolve_shards(source: str | Path | Sequence[str | Path]) -> list[str]:
    """A shard directory (with `index.json`), one tar path, or a list of them -> tar paths."""
    if isinstance(source, (str, Path)):
        source = [source]
    shards = []
    for item in source:
        path = Path(item)
        shards += [str(path / s["name"]) for s in load_index(path)["shards"]] if path.is_dir() else [str(path)]
    missing = [p for p in shards if not Path(p).is_file()]
    if missing:
        raise FileNotFoundError(f"shard file(s) not found: {missing[:5]}")
    if not shards:
        raise ValueError("no shards given")
    return shards


def assign_shards(shards: Sequence[str], *, seed: int, epoch: int, rank: int, world_size: int,
                  worker: int, num_workers: int, shuffle: bool = True) -> list[str]:
    """The shards read by one (rank, worker) slot in one epoch. Pure function; disjoint slots."""
    slots = world_size * num_workers
    if len(shards) < slots:
        raise ValueError(
            f"{len(shards)} shard(s) cannot feed {world_size} rank(s) x {num_workers} dataloader worker(s) = "
            f"{slots} readers: some would get no data, so ranks would run different numbers of steps and "
            f"hang. Rebuild with more shards (smaller --max-samples-per-shard) or use fewer workers.")
    order = list(range(len(shards)))
    if shuffle:
        random.Random(derive_seed(seed, epoch)).shuffle(order)
    return [shards[i] for i in order[rank * num_workers + worker::slots]]


def iter_raw_samples(shard_paths: Sequence[str]) -> Iterator[dict]:
    """Raw samples (`__key__`, `__url__`, member suffix -> bytes) from tar files, in order.

    A corrupt or truncated tar ends its shard; the loss is reported as one error item
    (`__error__`) in the stream, so it is counted and, like a sample, has a stream position.
    """
    for path in shard_paths:
        errors: list[Exception] = []

        def stop_shard(exc: Exception, errors: list[Exception] = errors) -> bool:
            errors.append(exc)
            return False  # webdataset: False = stop iterating this shard

        with open(path, "rb") as stream:
            files = tar_file_expander([{"url": path, "stream": stream}], handler=stop_shard)
            yield from group_by_keys(files, handler=stop_shard)
        if errors:
            yield {"__key__": f"<rest of {Path(path).name}>", "__url__": path, "__error__": repr(errors[0])}


def _member(raw: dict, name: str, what: str, max_bytes: int) -> bytes:
    data = raw.get(name.lower())  # webdataset lower-cases member suffixes
    if data is None:
        raise SampleRejected(MISSING_MEDIA, f"{what} member {raw['__key__']}.{name} referenced by the JSON is "
                                            f"missing (truncated shard?)")
    if len(data) > max_bytes:  # before any decoder sees it
        raise SampleRejected(MEDIA_TOO_LARGE, f"{what} member {name!r} is {len(data):,} bytes, over the "
                                              f"{max_bytes:,}-byte limit")
    return data


def _checked_name(name: str, allowed: frozenset, what: str) -> str:
    if extension(name) not in allowed:
        raise SampleRejected(UNSUPPORTED_MEDIA, f"{what} member {name!r}: extension not one of {sorted(allowed)}")
    return name


def decode_raw_sample(raw: dict, *, audio_sampling_rate: int | None = DEFAULT_AUDIO_RATE, max_length: int | None = None,
                      length_fn: Callable[[dict], int] | None = None, max_record_bytes: int = MAX_RECORD_BYTES,
                      max_member_bytes: int = DEFAULT_LIMITS.max_file_bytes) -> dict:
    """Check and decode one raw shard sample. Raises `SampleRejected` naming the reason. A `.json` member over
    `max_record_bytes` or a media member over `max_member_bytes` is rejected before it is parsed or decoded."""
    if "__error__" in raw:
        raise SampleRejected(SHARD_READ_ERROR,
                             f"shard is corrupt or truncated; rest of it skipped ({raw['__error__']})")
    pickles = sorted(k for k in raw if not k.startswith("__") and k.rsplit(".", 1)[-1] in PICKLE_EXTENSIONS)
    if pickles:
        raise SampleRejected(PICKLE_MEMBER, f"member(s) {pickles} use a pickle-based format; never decoded")
    if "json" not in raw:
        raise SampleRejected(MALFORMED_JSON, "no .json member (truncated shard, or not written by build_shards)")
    if len(raw["json"]) > max_record_bytes:
        raise SampleRejected(RECORD_TOO_LARGE, f"the .json member is {len(raw['json']):,} bytes, over the "
                                               f"{max_record_bytes:,}-byte limit")
    try:
        text = raw["json"].decode("utf-8")
    except UnicodeDecodeError as exc:
        raise SampleRejected(NON_UTF8, f"the .json member has a non-UTF-8 byte at {exc.start}") from None
    try:
        sample = json.loads(text)
    except json.JSONDecodeError as exc:
        raise SampleRejected(MALFORMED_JSON,
                             f"the .json member does not parse: {exc.msg} at column {exc.colno}") from None
    sample = validate_sample(sample)
    check_length(sample, max_length, length_fn)

    # Completeness first (a truncated tar yields partial samples), then decoding.
    image_bytes = [_member(raw, _checked_name(n, IMAGE_EXTENSIONS, f"images[{i}]"), f"images[{i}]",
                           max_member_bytes) for i, n in enumerate(sample["images"])]
    video_bytes = []
    for i, video in enumerate(sample["videos"]):
        if isinstance(video, str):
            video_bytes.append(_member(raw, _checked_name(video, VIDEO_CONTAINER_EXTENSIONS, f"videos[{i}]"),
                                       f"videos[{i}]", max_member_bytes))
        else:
            video_bytes.append([_member(raw, _checked_name(n, IMAGE_EXTENSIONS, f"videos[{i}]"), f"videos[{i}]",
                                        max_member_bytes) for n in video])
    audio_bytes = [_member(raw, _checked_name(n, AUDIO_EXTENSIONS, f"audios[{i}]"), f"audios[{i}]",
                           max_member_bytes) for i, n in enumerate(sample["audios"])]

    images = [decode_image(data, f"images[{i}]") for i, data in enumerate(image_bytes)]
    videos, fps = [], list(sample.get("video_fps") or [None] * len(video_bytes))
    for i, data in enumerate(video_bytes):
        if isinstance(data, list):
            videos.append(decode_video_frames(data, f"videos[{i}]"))
        else:
            frames, container_fps = decode_video_container(data, f"videos[{i}] ({raw['__key__']} in {raw['__url__']})")
            videos.append(frames)
            fps[i] = fps[i] if fps[i] is not None else container_fps
    audios, rates = [], []
    for i, data in enumerate(audio_bytes):
        samples, rate = decode_audio(data, f"audios[{i}]", target_rate=audio_sampling_rate)
        audios.append(samples)
        rates.append(rate)
    return {
        "id": sample["id"],
        "key": raw["__key__"],
        "shard": raw["__url__"],
        "source": raw.get("__source__"),
        "messages": sample["messages"],
        "images": images,
        "videos": videos,
        "video_fps": fps,
        "audios": audios,
        "audio_sampling_rates": rates,
        "meta": sample["meta"],
    }


@dataclass
class ResumePlan:
    """Where each logical worker starts: raw stream offsets, counter snapshots, and the rotation that
    makes the DataLoader's first worker play the logical worker whose batch was due next."""

    epoch: int = 0
    rotation: int = 0
    offsets: dict[int, int] = field(default_factory=dict)
    counters: dict[int, dict] = field(default_factory=dict)
    # raw positions <= the offset that a batcher still held in its buffer: decoded again while skipping
    pending: dict[int, list[int]] = field(default_factory=dict)


@dataclass
class Tagged:
    """A yielded item plus where it came from. `drops_only` marks the end-of-stream report of drops
    that followed the last sample (so they are counted, and their positions consumed). `replayed`:
    a buffered sample re-read on resume: its own raw position (`position` is then the offset reached)."""

    item: Any
    worker: int
    position: int
    counters: dict
    drops_only: bool = False
    replayed: int | None = None


class ShardDataset(IterableDataset):
    """Decoded samples from shards for one rank; splits over dataloader workers by itself.

    `transform(sample)` (e.g. the processor) runs in the worker on the decoded sample dict:
    `id, key, shard, messages, images [PIL RGB], videos [[PIL RGB]], video_fps, audios [float32 mono],
    audio_sampling_rates, meta`. Use `set_epoch` before each epoch (or `ResumableLoader`, which does).
    """

    def __init__(self, shards: str | Path | Sequence[str | Path], *, rank: int | None = None,
                 world_size: int | None = None, seed: int = 0, shuffle: bool = True, shuffle_buffer: int = 256,
                 transform: Callable[[dict], Any] | None = None, audio_sampling_rate: int | None = DEFAULT_AUDIO_RATE,
                 max_length: int | None = None, length_fn: Callable[[dict], int] | None = None,
                 policy: DropPolicy | None = None):
        super().__init__()
        if rank is None or world_size is None:
            rank, world_size = _distributed_defaults(rank, world_size)
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
        self.shards = resolve_shards(shards)
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.shuffle, self.shuffle_buffer = shuffle, shuffle_buffer
        self.transform = transform
        self.audio_sampling_rate = audio_sampling_rate
        self.max_length, self.length_fn = max_length, length_fn
        self.policy = policy or DropPolicy()
        self.plan = ResumePlan()

    def set_epoch(self, epoch: int) -> None:
        self.plan = ResumePlan(epoch=epoch)

    def fingerprint_fields(self) -> dict:
        """What determines the sample order besides (seed, epoch, rank, world, workers)."""
        return {"shards": [Path(s).name for s in self.shards], "shuffle": self.shuffle,
                "shuffle_buffer": self.shuffle_buffer}

    def fingerprint(self) -> str:
        """Stored with a loader position: resuming onto a different dataset must fail, not drift."""
        text = json.dumps(self.fingerprint_fields(), sort_keys=True)
        return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]

    def check_slots(self, num_workers: int) -> None:
        """Fail early (before workers start) when some (rank, worker) slot would get no shard."""
        assign_shards(self.shards, seed=self.seed, epoch=0, rank=self.rank, world_size=self.world_size,
                      worker=0, num_workers=max(1, num_workers), shuffle=False)

    def _warn_if_uneven(self, num_workers: int) -> None:
        if self.world_size > 1 and len(self.shards) % (self.world_size * num_workers):
            logger.warning("%d shards do not split evenly over %d ranks x %d workers: ranks see different "
                           "sample counts (use a fixed epoch length to keep ranks in step)",
                           len(self.shards), self.world_size, num_workers)

    def _raw_stream(self, worker: int, num_workers: int) -> Iterator[dict]:
        """This slot's raw samples for the current epoch: a pure function of (seed, epoch, rank, worker)."""
        return self._shuffled_raw(self.shards, self.seed, self.plan.epoch, worker, num_workers)

    def _shuffled_raw(self, shards: Sequence[str], seed: int, epoch: int, worker: int,
                      num_workers: int) -> Iterator[dict]:
        mine = assign_shards(shards, seed=seed, epoch=epoch, rank=self.rank, world_size=self.world_size,
                             worker=worker, num_workers=num_workers, shuffle=self.shuffle)
        stream = iter_raw_samples(mine)
        if self.shuffle and self.shuffle_buffer > 1:
            rng = random.Random(derive_seed(seed, epoch, self.rank, worker))
            stream = wds.shuffle(self.shuffle_buffer, self.shuffle_buffer, rng=rng)(stream)
        return stream

    def __iter__(self) -> Iterator[Any]:
        return (tagged.item for tagged in self.iter_tagged() if not tagged.drops_only)

    def iter_tagged(self) -> Iterator[Tagged]:
        """Like iteration, but each item carries its worker, raw position and counters (for resuming)."""
        info = get_worker_info()
        physical, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        worker = (physical + self.plan.rotation) % num_workers
        if worker == 0 and self.rank == 0:
            self._warn_if_uneven(num_workers)
        offset = self.plan.offsets.get(worker, 0)
        counters = DropCounters.from_state_dict(self.plan.counters[worker]) if worker in self.plan.counters \
            else DropCounters()
        replay = set(self.plan.pending.get(worker, ()))
        if replay and max(replay) > offset:
            raise ValueError(f"resume plan of worker {worker}: buffered positions {sorted(replay)} run past its "
                             f"offset {offset}")
        pending_drops = False
        position = 0
        for position, raw in enumerate(self._raw_stream(worker, num_workers), start=1):
            if position <= offset:
                if position in replay:  # a batcher held this sample when the position was saved
                    replay.discard(position)
                    yield Tagged(self._replay(raw, position), worker, offset, counters.state_dict(), replayed=position)
                continue  # resume: already consumed; skipped before any decoding
            try:
                sample = decode_raw_sample(raw, audio_sampling_rate=self.audio_sampling_rate,
                                           max_length=self.max_length, length_fn=self.length_fn)
                # inside the try: a transform may reject too (e.g. the exact token length is over max_length)
                item = self.transform(sample) if self.transform is not None else sample
            except SampleRejected as exc:
                self.policy.reject(counters, exc, key=raw.get("__key__", "?"), shard=raw.get("__url__", "?"))
                pending_drops = True
                continue
            counters.record_accept()
            pending_drops = False
            yield Tagged(item, worker, position, counters.state_dict())
        if replay:
            raise ValueError(f"resume plan of worker {worker}: buffered positions {sorted(replay)} are past the end "
                             f"of its stream (was the dataset changed?)")
        if pending_drops:
            yield Tagged(None, worker, position, counters.state_dict(), drops_only=True)

    def _replay(self, raw: dict, position: int) -> Any:
        """Decode a buffered sample again (already counted as accepted when it was first read)."""
        try:
            sample = decode_raw_sample(raw, audio_sampling_rate=self.audio_sampling_rate,
                                       max_length=self.max_length, length_fn=self.length_fn)
            return self.transform(sample) if self.transform is not None else sample
        except SampleRejected as exc:
            raise ValueError(f"cannot resume exactly: the buffered sample at raw position {position} "
                             f"({raw.get('__key__', '?')} in {raw.get('__url__', '?')}) was accepted before but is "
                             f"rejected now ({exc})") from None


def _distributed_defaults(rank: int | None, world_size: int | None) -> tuple[int, int]:
    """Rank/world from an initialised default process group, else (0, 1). Only reads them."""
    import torch.distributed as dist

    initialised = dist.is_available() and dist.is_initialized()
    if rank is None:
        rank = dist.get_rank() if initialised else 0
    if world_size is None:
        world_size = dist.get_world_size() if initialised else 1
    return rank, world_size
