"""Shard writer: a manifest + a media root -> webdataset tar shards + `index.json`.

Layout of a sample with key K inside a shard (media bytes stored as-is):
`K.json` (the canonical sample, media paths replaced by member names such as "image0.png"),
`K.image0.png`, `K.video0.frame000.png` ... or `K.video0.mp4`, `K.audio0.wav`.

Every sample is validated and its media decoded once before it is written; rejects go to the
index with their reason. Output is reproducible: fixed mtime/uid/gid/mode and manifest order,
so re-running on the same input gives byte-identical shards and index.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tqdm import tqdm
from webdataset import TarWriter

from .importers import count_manifest_records, read_manifest, to_canonical
from .media import (
    AUDIO_EXTENSIONS,
    DEFAULT_AUDIO_RATE,
    DEFAULT_LIMITS,
    IMAGE_EXTENSIONS,
    VIDEO_CONTAINER_EXTENSIONS,
    decode_audio,
    decode_image,
    decode_video_container,
    MediaLimits,
    extension,
)
from .media_files import read_media_file
from .quality import (
    DUPLICATE_ID,
    UNSUPPORTED_MEDIA,
    VIDEO_DECODE,
    DropCounters,
    DropPolicy,
    SampleRejected,
)
from .schema import MEDIA_KINDS, check_length, make_token_length_fn, validate_sample

INDEX_NAME = "index.json"
INDEX_FORMAT = "omni-shards-v1"
SHARD_NAME = "shard-{:06d}.tar"
_SHARD_RE = re.compile(r"^shard-\d{6}\.tar$")
_TAR_BLOCK = 512
_TAR_END = 2 * _TAR_BLOCK + 20 * _TAR_BLOCK  # end-of-archive blocks + worst-case record padding


def shard_key(sample_id: str) -> str:
    """Tar-safe, dot-free key for a sample id (webdataset splits member names at the first dot).

    Ids that are already safe are kept; others get a readable prefix plus a hash of the id, so two
    different ids never share a key except by hash collision (caught as a duplicate).
    """
    safe = re.sub(r"[^A-Za-z0-9_-]", "_", sample_id)
    if safe == sample_id and len(safe) <= 64:
        return safe
    return f"{safe[:48]}_{hashlib.sha1(sample_id.encode('utf-8')).hexdigest()[:12]}"


def _read_media(media_root: Path, relative: str, what: str, allowed: frozenset,
                limits: MediaLimits) -> tuple[bytes, str]:
    ext = extension(relative) if isinstance(relative, str) else ""
    if ext not in allowed:
        raise SampleRejected(UNSUPPORTED_MEDIA,
                             f"{what} {relative!r}: extension {ext!r} is not one of {sorted(allowed)}")
    return read_media_file(media_root, relative, what, limits), ext


def pack_sample(sample: dict, media_root: Path, *, audio_sampling_rate: int | None = DEFAULT_AUDIO_RATE,
                limits: MediaLimits = DEFAULT_LIMITS) -> tuple[dict[str, bytes], dict]:
    """Read and decode-check every media file of a validated sample, exactly as the reader will decode it (audio
    resampled to `audio_sampling_rate`, the reader's default), so what the build accepts the reader can read.

    Returns the shard members (name after the key -> bytes, including "json") and a media count.
    """
    members: dict[str, bytes] = {}
    stored = {k: v for k, v in sample.items() if k not in ("images", "videos", "audios")}
    stored.update(images=[], videos=[], audios=[])
    frames_total = 0
    for i, rel in enumerate(sample["images"]):
        data, ext = _read_media(media_root, rel, f"images[{i}]", IMAGE_EXTENSIONS, limits)
        decode_image(data, f"images[{i}] {rel!r}", limits=limits)
        members[f"image{i}.{ext}"] = data
        stored["images"].append(f"image{i}.{ext}")
    for i, video in enumerate(sample["videos"]):
        if isinstance(video, str):
            data, ext = _read_media(media_root, video, f"videos[{i}]", VIDEO_CONTAINER_EXTENSIONS, limits)
            frames, _ = decode_video_container(data, f"videos[{i}] {video!r}", limits=limits)
            frames_total += len(frames)
            members[f"video{i}.{ext}"] = data
            stored["videos"].append(f"video{i}.{ext}")
            continue
        names = []
        for j, rel in enumerate(video):
            data, ext = _read_media(media_root, rel, f"videos[{i}] frame {j}", IMAGE_EXTENSIONS, limits)
            decode_image(data, f"videos[{i}] frame {j} {rel!r}", reason=VIDEO_DECODE, limits=limits)
            names.append(f"video{i}.frame{j:03d}.{ext}")
            members[names[-1]] = data
        frames_total += len(video)
        stored["videos"].append(names)
    for i, rel in enumerate(sample["audios"]):
        data, ext = _read_media(media_root, rel, f"audios[{i}]", AUDIO_EXTENSIONS, limits)
        decode_audio(data, f"audios[{i}] {rel!r}", target_rate=audio_sampling_rate, limits=limits)
        members[f"audio{i}.{ext}"] = data
        stored["audios"].append(f"audio{i}.{ext}")
    members["json"] = json.dumps(stored, sort_keys=True, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
    counts = {"images": len(sample["images"]), "videos": len(sample["videos"]),
              "video_frames": frames_total, "audios": len(sample["audios"])}
    return members, counts


def _tar_size(members: dict[str, bytes]) -> int:
    return sum(_TAR_BLOCK + math.ceil(len(v) / _TAR_BLOCK) * _TAR_BLOCK for v in members.values())


class _ShardSink:
    """Rolls over to a new shard at `max_samples` samples or before `max_bytes` would be exceeded."""

    def __init__(self, out_dir: Path, max_samples: int, max_bytes: int):
        self.out_dir, self.max_samples, self.max_bytes = out_dir, max_samples, max_bytes
        self.shards: list[dict] = []
        self._writer = self._file = None
        self._count = self._bytes = 0

    def add(self, key: str, members: dict[str, bytes]) -> None:
        size = _tar_size(members)
        if self._writer is not None and (
            self._count >= self.max_samples or self._bytes + size + _TAR_END > self.max_bytes
        ):
            self._finish()
        if self._writer is None:
            name = SHARD_NAME.format(len(self.shards))
            self._file = open(self.out_dir / (name + ".tmp"), "wb")
            # Fixed metadata makes the bytes a pure function of the input (reproducible builds).
            self._writer = TarWriter(self._file, encoder=False, mtime=0, user="", group="", mode=0o444)
            self.shards.append({"name": name})
            self._count = self._bytes = 0
        self._writer.write({"__key__": key, **members})
        self._count += 1
        self._bytes += size

    def _finish(self) -> None:
        self._writer.close()
        self._file.close()
        entry = self.shards[-1]
        tmp = self.out_dir / (entry["name"] + ".tmp")
        data = tmp.read_bytes()
        entry.update(samples=self._count, bytes=len(data), sha256=hashlib.sha256(data).hexdigest())
        os.replace(tmp, self.out_dir / entry["name"])
        self._writer = self._file = None

    def close(self) -> list[dict]:
        if self._writer is not None:
            self._finish()
        return self.shards

    def abort(self) -> None:
        """Drop the shard being written (a failed build leaves no half-written shard behind)."""
        if self._writer is not None:
            self._writer.close()
            self._file.close()
            (self.out_dir / (self.shards[-1]["name"] + ".tmp")).unlink(missing_ok=True)
            self._writer = self._file = None


def _histogram(lengths: list[int]) -> list[dict]:
    """Counts per power-of-two bucket: {"le": 16} holds lengths <= 16, {"le": 32} 17..32, ..."""
    if not lengths:
        return []
    edges, edge = [], 16
    while True:
        edges.append(edge)
        if edge >= max(lengths):
            break
        edge *= 2
    counts = [0] * len(edges)
    for length in lengths:
        counts[next(i for i, e in enumerate(edges) if length <= e)] += 1
    return [{"le": e, "count": c} for e, c in zip(edges, counts, strict=True)]


def build_shards(
    manifest: str | Path,
    media_root: str | Path,
    out_dir: str | Path,
    *,
    max_samples_per_shard: int = 1000,
    max_shard_bytes: int = 1 << 30,
    max_length: int | None = None,
    tokenizer: Any = None,
    length_fn: Callable[[dict], int] | None = None,
    policy: DropPolicy | None = None,
    progress: bool = True,
    audio_sampling_rate: int | None = DEFAULT_AUDIO_RATE,
    limits: MediaLimits = DEFAULT_LIMITS,
) -> dict:
    """Validate, decode-check and pack every manifest sample into tar shards; write `index.json`.

    Lengths (histogram and `max_length`) use `length_fn`, else the tokenizer's token count, else
    characters. Returns the index dict. Replaces shards of a previous build in `out_dir`
    (files named `shard-NNNNNN.tar` and `index.json`; nothing else is touched).
    """
    if max_samples_per_shard < 1 or max_shard_bytes < 1:
        raise ValueError("max_samples_per_shard and max_shard_bytes must be positive")
    manifest, media_root, out_dir = Path(manifest), Path(media_root), Path(out_dir)
    if not manifest.is_file():
        raise FileNotFoundError(f"manifest {manifest} does not exist")
    if not media_root.is_dir():
        raise FileNotFoundError(f"media root {media_root} is not a directory")
    policy = policy or DropPolicy()
    unit = "custom" if length_fn else ("tokens" if tokenizer is not None else "chars")
    if length_fn is None and tokenizer is not None:
        length_fn = make_token_length_fn(tokenizer)
    out_dir.mkdir(parents=True, exist_ok=True)

    counters = DropCounters()
    sink = _ShardSink(out_dir, max_samples_per_shard, max_shard_bytes)
    keys: dict[str, str] = {}
    rejected, lengths = [], []
    modalities = {m: 0 for m in ("text", *MEDIA_KINDS)}
    media = {"images": 0, "videos": 0, "video_frames": 0, "audios": 0}
    entries = read_manifest(manifest)
    try:
        for entry in tqdm(entries, total=count_manifest_records(manifest), desc=f"build shards {manifest.name}",
                          unit="sample", disable=not progress):
            sample_id = None
            try:
                if entry.error is not None:
                    raise entry.error
                sample = to_canonical(entry.record, default_id=entry.default_id)
                sample_id = sample.get("id") if isinstance(sample, dict) else None
                sample = validate_sample(sample)
                length = check_length(sample, max_length, length_fn)
                key = shard_key(sample["id"])
                if key in keys:
                    raise SampleRejected(DUPLICATE_ID, f"id {sample['id']!r} maps to shard key {key!r}, "
                                         f"already used by {keys[key]}")
                members, counts = pack_sample(sample, media_root, audio_sampling_rate=audio_sampling_rate,
                                              limits=limits)
            except SampleRejected as exc:
                named = sample_id if isinstance(sample_id, str) else None
                rejected.append({"where": entry.where, "id": named, "reason": exc.reason, "message": exc.detail})
                policy.reject(counters, exc, key=named or "?", shard=entry.where)
                continue
            keys[key] = entry.where
            sink.add(key, members)
            counters.record_accept()
            lengths.append(length)
            modalities[sample["meta"]["modality"]] += 1
            for name, n in counts.items():
                media[name] += n
    except BaseException:
        sink.abort()
        raise
    shards = sink.close()
    for stale in out_dir.iterdir():
        if _SHARD_RE.match(stale.name) and stale.name not in {s["name"] for s in shards}:
            stale.unlink()

    index = {
        "format": INDEX_FORMAT,
        "manifest": manifest.name,
        "num_samples": counters.accepted,
        "shards": shards,
        "modalities": modalities,
        "media": media,
        "length": {"unit": unit, "max_length": max_length, "min": min(lengths, default=0),
                   "max": max(lengths, default=0), "histogram": _histogram(lengths)},
        "counters": counters.state_dict(),
        "rejected": rejected,
    }
    tmp = out_dir / (INDEX_NAME + ".tmp")
    tmp.write_text(json.dumps(index, indent=1, sort_keys=True, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(tmp, out_dir / INDEX_NAME)
    return index


def load_index(shard_dir: str | Path) -> dict:
    path = Path(shard_dir) / INDEX_NAME
    try:
        index = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FileNotFoundError(f"{path} not found: build the shards first (`omni data build`)") from None
    if index.get("format") != INDEX_FORMAT:
        raise ValueError(f"{path}: unknown index format {index.get('format')!r} (expected {INDEX_FORMAT!r})")
    return index
