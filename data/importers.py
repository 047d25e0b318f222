"""Importers: LLaVA/Uni-MoE JSON and plain JSONL manifests -> canonical samples (see `omni_moe.data.schema`).

LLaVA / Uni-MoE records look like
`{"id": ..., "image": "a.jpg" | [...], "video": "clip.mp4" | ["f0.jpg", ...], "audio"/"voice": "a.wav" | [...],
  "conversations": [{"from": "human"|"gpt"|"system", "value": "<image>\\n..."}]}`.
A video given as a list is *one* video made of frames (Uni-MoE's convention). A plain JSONL manifest
holds one canonical sample per line (a LLaVA record per line is converted as well).

Importers only translate; `validate_sample` judges. Nothing is repaired silently: a LLaVA record
whose first turn is not from the human is a role-order error here, not a dropped turn.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from .quality import BAD_SCHEMA, MALFORMED_JSON, NON_UTF8, RECORD_TOO_LARGE, SampleRejected
from .schema import MAX_JSON_MANIFEST_BYTES, MAX_RECORD_BYTES

LLAVA_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}


def _as_list(value, field: str) -> list:
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    if isinstance(value, list):
        return list(value)
    raise SampleRejected(BAD_SCHEMA, f"LLaVA field {field!r} must be a string or a list, got {type(value).__name__}")


def is_llava_record(record: dict) -> bool:
    return "conversations" in record and "messages" not in record


def llava_to_canonical(record: dict, *, default_id: str | None = None) -> dict:
    """One LLaVA/Uni-MoE record -> a canonical sample (not yet validated)."""
    if not isinstance(record, dict):
        raise SampleRejected(BAD_SCHEMA, f"a LLaVA record must be a JSON object, got {type(record).__name__}")
    conversations = record.get("conversations")
    if not isinstance(conversations, list):
        raise SampleRejected(BAD_SCHEMA, "LLaVA 'conversations' must be a list")
    messages = []
    for i, turn in enumerate(conversations):
        if not isinstance(turn, dict):
            raise SampleRejected(BAD_SCHEMA, f"conversations[{i}] must be an object")
        speaker = turn.get("from")
        if speaker not in LLAVA_ROLES:
            raise SampleRejected(BAD_SCHEMA, f"conversations[{i}].from {speaker!r} is not one of {sorted(LLAVA_ROLES)}")
        messages.append({"role": LLAVA_ROLES[speaker], "content": turn.get("value")})

    if record.get("audio") is not None and record.get("voice") is not None:
        raise SampleRejected(BAD_SCHEMA, "both 'audio' and 'voice' are given: the order of <audio> media is ambiguous")
    video = record.get("video")
    if video is None:
        videos = []
    elif isinstance(video, (str, list)):
        videos = [video]  # a list is the frames of one video
    else:
        raise SampleRejected(BAD_SCHEMA, f"LLaVA field 'video' must be a string or a list, got {type(video).__name__}")

    sample_id = record.get("id", default_id)
    if isinstance(sample_id, int) and not isinstance(sample_id, bool):
        sample_id = str(sample_id)
    meta = dict(record.get("meta") or {})
    meta.setdefault("source_format", "llava")
    sample = {
        "id": sample_id,
        "messages": messages,
        "images": _as_list(record.get("image"), "image"),
        "videos": videos,
        "audios": _as_list(record.get("audio", record.get("voice")), "audio/voice"),
        "meta": meta,
    }
    fps = record.get("video_fps", record.get("fps"))
    if fps is not None and videos:
        sample["video_fps"] = fps if isinstance(fps, list) else [fps]
    return sample


def to_canonical(record, *, default_id: str | None = None) -> dict:
    """A manifest record in either format -> canonical sample (canonical records pass through)."""
    if isinstance(record, dict) and is_llava_record(record):
        return llava_to_canonical(record, default_id=default_id)
    if isinstance(record, dict) and "id" not in record and default_id is not None:
        record = {**record, "id": default_id}
    return record


@dataclass
class ManifestEntry:
    """One manifest record, or the reason it could not be parsed. `where` is `file:line`/`file[i]`."""

    where: str
    default_id: str
    record: dict | None = None
    error: SampleRejected | None = None


def _parse_line(raw: bytes) -> dict:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise SampleRejected(NON_UTF8, f"byte {exc.start} is not UTF-8 ({exc.reason})") from None
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise SampleRejected(MALFORMED_JSON, f"{exc.msg} at column {exc.colno}") from None
    if not isinstance(value, dict):
        raise SampleRejected(MALFORMED_JSON, f"expected a JSON object, got {type(value).__name__}")
    return value


def read_manifest(path: str | Path, *, max_record_bytes: int = MAX_RECORD_BYTES,
                  max_json_bytes: int = MAX_JSON_MANIFEST_BYTES) -> Iterator[ManifestEntry]:
    """Yield every record of a `.jsonl` (one object per line) or `.json` (a list of objects) manifest.

    A bad JSONL line becomes an entry with `error` set (so it is counted, not fatal), and so does a line over
    `max_record_bytes` (read in bounded pieces and skipped to its end: memory stays bounded, the next line is read
    as usual); a `.json` manifest that does not parse as a whole, or is over `max_json_bytes`, is fatal (`ValueError`),
    as no sample can be located.
    """
    path = Path(path)
    if path.suffix == ".json":
        size = path.stat().st_size
        if size > max_json_bytes:
            raise ValueError(f"manifest {path} is {size:,} bytes, over the {max_json_bytes:,}-byte limit of a .json "
                             "manifest (parsed as one document); write it as JSONL, one sample a line")
        try:
            records = json.loads(path.read_bytes().decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ValueError(f"manifest {path} is not a valid UTF-8 JSON document: {exc}") from None
        if not isinstance(records, list):
            raise ValueError(f"manifest {path} must hold a JSON list of samples, got {type(records).__name__}")
        for i, record in enumerate(records):
            entry = ManifestEntry(where=f"{path.name}[{i}]", default_id=f"{path.stem}-{i:08d}")
            if isinstance(record, dict):
                entry.record = record
            else:
                entry.error = SampleRejected(MALFORMED_JSON, f"expected a JSON object, got {type(record).__name__}")
            yield entry
        return
    with open(path, "rb") as handle:
        for line_no, raw in enumerate(_bounded_lines(handle, max_record_bytes), start=1):
            if raw is not None and not raw.strip():
                continue
            entry = ManifestEntry(where=f"{path.name}:{line_no}", default_id=f"{path.stem}-{line_no:08d}")
            if raw is None:
                entry.error = SampleRejected(RECORD_TOO_LARGE, f"the line is over {max_record_bytes:,} bytes")
                yield entry
                continue
            try:
                entry.record = _parse_line(raw)
            except SampleRejected as exc:
                entry.error = exc
            yield entry


def _bounded_lines(handle, limit: int) -> Iterator[bytes | None]:
    """The lines of a binary file, each at most `limit` bytes; a longer line is consumed and given as None."""
    while True:
        line = handle.readline(limit + 1)
        if not line:
            return
        if len(line) <= limit or line.endswith(b"\n") and len(line) == limit + 1:
            yield line
            continue
        while line and not line.endswith(b"\n"):  # skip the rest of the oversized line
            line = handle.readline(1 << 20)
        yield None


def count_manifest_records(path: str | Path) -> int | None:
    """Cheap total for the progress bar (non-blank lines of a JSONL file; None for `.json`)."""
    path = Path(path)
    if path.suffix == ".json":
        return None
    with open(path, "rb") as handle:
        return sum(1 for raw in _bounded_lines(handle, MAX_RECORD_BYTES) if raw is None or raw.strip())
