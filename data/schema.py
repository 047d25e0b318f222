"""The canonical sample: one conversation format for every dataset, validated with precise errors.

```
{"id": "train-image-000017",
 "messages": [{"role": "system", "content": "..."},            # optional, first only
              {"role": "user", "content": "<image>\\nWhat colour is the shape?"},
              {"role": "assistant", "content": "red"}],
 "images": ["images/000017.png"],
 "videos": [["videos/3/f0.png", "videos/3/f1.png"]],           # frame files, or one container "clip.mp4"
 "video_fps": [2.0],                                            # optional, one per video
 "audios": ["audio/000002.wav"],
 "meta": {"modality": "image", ...}}
```

Optional `meta` fields the pipeline reads: `modality` (one of MODALITIES; inferred from the first media marker when
absent), `task` (eval groups results by it), `media_text` (`strip_media`), and `metric` -- how evaluation should
judge the answer, one of ANSWER_METRICS: "exact_match" and "token_f1" are reported for every sample anyway, and a
sample with "wer" (a transcription: the answer is a word sequence where each word counts) adds word error rate to
the eval groups it belongs to (`omni_moe.training.scoring`).

`validate_sample` raises `SampleRejected(reason, detail)` naming the offending field; the reasons
are the counters of `omni_moe.data.quality`. Inside a shard the media paths are member names; the rules
are the same.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

from .quality import (
    BAD_ROLE_ORDER,
    BAD_SCHEMA,
    EMPTY_ASSISTANT,
    EMPTY_VIDEO,
    MARKER_MISMATCH,
    NON_UTF8,
    TOO_LONG,
    SampleRejected,
)

MODALITIES = ("text", "image", "video", "audio")
# One sample's JSON record (a manifest line, a shard's .json member): far above any real conversation, low enough
# that a runaway line (a whole file without newlines, a base64 blob pasted inline) is rejected before it is parsed.
MAX_RECORD_BYTES = 16 * 1024 * 1024
# A `.json` manifest is parsed as one document: past this, use JSONL (one record a line, read line by line).
MAX_JSON_MANIFEST_BYTES = 1024 * 1024 * 1024
MEDIA_KINDS = ("image", "video", "audio")
MEDIA_FIELDS = {"image": "images", "video": "videos", "audio": "audios"}
MARKERS = {"image": "<image>", "video": "<video>", "audio": "<audio>"}
ROLES = ("system", "user", "assistant")
WER_METRIC = "wer"  # meta.metric of a transcription sample
ANSWER_METRICS = ("exact_match", "token_f1", WER_METRIC)  # values of the optional meta.metric
_MARKER_RE = re.compile("(" + "|".join(re.escape(m) for m in MARKERS.values()) + ")")
_KIND_OF_MARKER = {marker: kind for kind, marker in MARKERS.items()}

LengthFn = Callable[[dict], int]


def count_markers(text: str) -> dict[str, int]:
    """Number of `<image>`, `<video>`, `<audio>` markers in `text`, keyed by media kind."""
    return {kind: text.count(marker) for kind, marker in MARKERS.items()}


def marker_order(messages: list[dict]) -> list[str]:
    """Media kinds in the order their markers appear across the conversation."""
    return [_KIND_OF_MARKER[m] for msg in messages for m in _MARKER_RE.findall(msg["content"])]


def primary_modality(sample: dict) -> str:
    """`meta.modality` if set, else "text" without media, else the kind of the first marker."""
    meta = sample.get("meta") or {}
    if meta.get("modality"):
        return meta["modality"]
    order = marker_order(sample["messages"])
    return order[0] if order else "text"


def conversation_text(sample: dict) -> str:
    return "\n".join(msg["content"] for msg in sample["messages"])


def char_length(sample: dict) -> int:
    """Length proxy without a tokenizer: characters of all message contents."""
    return sum(len(msg["content"]) for msg in sample["messages"])


def make_token_length_fn(tokenizer: Any) -> LengthFn:
    """Length in tokens of the conversation text (markers counted as text: a lower bound on the
    model sequence, which also holds the media tokens). Accepts a `tokenizers.Tokenizer` or a
    transformers tokenizer."""

    def token_length(sample: dict) -> int:
        text = conversation_text(sample)
        encoded = tokenizer.encode(text, add_special_tokens=False)
        return len(encoded.ids if hasattr(encoded, "ids") else encoded)

    return token_length


def strip_media(sample: dict) -> dict:
    """The sample as text alone, what a text-only model (stage 0's dense LLM) learns from a multimodal dataset: media
    fields dropped, and each media marker replaced by its description in `meta.media_text` (one string per marker,
    in order of appearance) or, without one, removed (surrounding whitespace tidied).

    With descriptions the text model learns to answer from what the media show, put in words ("a red circle at the
    top left" + "Which colour is the shape?" -> "red"): the in-context reading a pretrained LLM brings to alignment.
    Without them it can only learn the answers' prior, and that the context does not tell."""
    descriptions = list((sample.get("meta") or {}).get("media_text") or [])

    def replace(match: re.Match) -> str:
        return f" {descriptions.pop(0)} " if descriptions else " "

    messages = [{**msg, "content": " ".join(_MARKER_RE.sub(replace, msg["content"]).split())}
                for msg in sample["messages"]]
    return {k: v for k, v in sample.items() if k not in MEDIA_FIELDS.values() and k != "video_fps"} | \
        {"messages": messages}


def to_processor_messages(messages: list[dict]) -> list[dict]:
    """Canonical string contents -> processor parts, split on the three markers.

    `"<image>\\nWhat?"` -> `[{"type": "image"}, {"type": "text", "text": "\\nWhat?"}]`; empty text
    pieces are dropped, everything else is kept verbatim (the processor owns formatting).
    """
    converted = []
    for msg in messages:
        parts = []
        for piece in _MARKER_RE.split(msg["content"]):
            if piece in _KIND_OF_MARKER:
                parts.append({"type": _KIND_OF_MARKER[piece]})
            elif piece:
                parts.append({"type": "text", "text": piece})
        converted.append({"role": msg["role"], "content": parts})
    return converted


def _check_utf8(value: Any, where: str) -> None:
    """JSON can carry lone surrogates (\\udcff) that are not encodable text; find them by path."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise SampleRejected(NON_UTF8, f"{where} is not valid UTF-8 text ({exc.reason} at {exc.start})") from None
    elif isinstance(value, dict):
        for k, v in value.items():
            _check_utf8(k, f"{where} key")
            _check_utf8(v, f"{where}.{k}")
    elif isinstance(value, list):
        for i, v in enumerate(value):
            _check_utf8(v, f"{where}[{i}]")


def _check_messages(messages: Any) -> None:
    if not isinstance(messages, list) or not messages:
        raise SampleRejected(BAD_SCHEMA, "'messages' must be a non-empty list")
    for i, msg in enumerate(messages):
        if not isinstance(msg, dict):
            raise SampleRejected(BAD_SCHEMA, f"messages[{i}] must be an object, got {type(msg).__name__}")
        if msg.get("role") not in ROLES:
            raise SampleRejected(BAD_SCHEMA, f"messages[{i}].role {msg.get('role')!r} is not one of {ROLES}")
        if not isinstance(msg.get("content"), str):
            raise SampleRejected(
                BAD_SCHEMA, f"messages[{i}].content must be a string, got {type(msg.get('content')).__name__}")
    start = 1 if messages[0]["role"] == "system" else 0
    turns = messages[start:]
    for i, msg in enumerate(turns, start=start):
        expected = "user" if (i - start) % 2 == 0 else "assistant"
        if msg["role"] != expected:
            where = "a system message is only allowed first" if msg["role"] == "system" else f"expected {expected!r}"
            raise SampleRejected(BAD_ROLE_ORDER, f"messages[{i}] has role {msg['role']!r}: {where}")
    if not turns:
        raise SampleRejected(BAD_ROLE_ORDER, "no user/assistant turns after the system message")
    if turns[-1]["role"] != "assistant":
        raise SampleRejected(BAD_ROLE_ORDER, f"the conversation ends with {turns[-1]['role']!r}, not 'assistant'")
    for i, msg in enumerate(messages):
        if msg["role"] == "assistant" and not msg["content"].strip():
            raise SampleRejected(EMPTY_ASSISTANT, f"messages[{i}] (assistant) is empty")


def _check_media(sample: dict) -> None:
    for kind, name in MEDIA_FIELDS.items():
        entries = sample.get(name, [])
        if not isinstance(entries, list):
            raise SampleRejected(BAD_SCHEMA, f"'{name}' must be a list, got {type(entries).__name__}")
        for i, entry in enumerate(entries):
            if kind == "video" and isinstance(entry, list):
                if not entry:
                    raise SampleRejected(EMPTY_VIDEO, f"videos[{i}] has 0 frames")
                bad = [f for f in entry if not isinstance(f, str) or not f]
                if bad:
                    raise SampleRejected(BAD_SCHEMA, f"videos[{i}] frames must be non-empty strings, got {bad[0]!r}")
            elif not isinstance(entry, str) or not entry:
                expected = "a frame list or a file path" if kind == "video" else "a file path"
                raise SampleRejected(BAD_SCHEMA, f"{name}[{i}] must be {expected}, got {entry!r}")
    fps = sample.get("video_fps")
    if fps is not None:
        if not isinstance(fps, list) or len(fps) != len(sample.get("videos", [])):
            raise SampleRejected(BAD_SCHEMA, "'video_fps' must be a list with one entry per video")
        for i, value in enumerate(fps):
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0):
                raise SampleRejected(BAD_SCHEMA, f"video_fps[{i}] must be a positive number or null, got {value!r}")
    totals = {kind: 0 for kind in MEDIA_KINDS}
    for msg in sample["messages"]:
        for kind, n in count_markers(msg["content"]).items():
            totals[kind] += n
    for kind, name in MEDIA_FIELDS.items():
        have = len(sample.get(name, []))
        if totals[kind] != have:
            raise SampleRejected(
                MARKER_MISMATCH, f"{totals[kind]} {MARKERS[kind]} marker(s) in the messages but {have} entr"
                f"{'y' if have == 1 else 'ies'} in '{name}'")


def validate_sample(sample: Any, *, max_length: int | None = None, length_fn: LengthFn | None = None) -> dict:
    """Check every canonical rule; return a normalised copy (all media lists present, `meta.modality` set).

    Raises `SampleRejected` with the reason counter and a message naming the field.
    """
    if not isinstance(sample, dict):
        raise SampleRejected(BAD_SCHEMA, f"a sample must be a JSON object, got {type(sample).__name__}")
    sample_id = sample.get("id")
    if not isinstance(sample_id, str) or not sample_id.strip():
        raise SampleRejected(BAD_SCHEMA, f"'id' must be a non-empty string, got {sample_id!r}")
    _check_utf8(sample, "sample")
    _check_messages(sample.get("messages"))
    _check_media(sample)
    meta = sample.get("meta", {})
    if not isinstance(meta, dict):
        raise SampleRejected(BAD_SCHEMA, f"'meta' must be an object, got {type(meta).__name__}")
    if meta.get("modality") is not None and meta["modality"] not in MODALITIES:
        raise SampleRejected(BAD_SCHEMA, f"meta.modality {meta['modality']!r} is not one of {MODALITIES}")
    if meta.get("metric") is not None and meta["metric"] not in ANSWER_METRICS:
        raise SampleRejected(BAD_SCHEMA, f"meta.metric {meta['metric']!r} is not one of {ANSWER_METRICS}")

    normalised = dict(sample)
    for name in MEDIA_FIELDS.values():
        normalised[name] = list(sample.get(name, []))
    normalised["meta"] = dict(meta)
    normalised["meta"]["modality"] = primary_modality(normalised)
    if max_length is not None:
        check_length(normalised, max_length, length_fn)
    return normalised


def check_length(sample: dict, max_length: int | None, length_fn: LengthFn | None = None) -> int:
    """Return `length_fn(sample)` (default: `char_length`); reject it when above `max_length`."""
    length = int((length_fn or char_length)(sample))
    if max_length is not None and length > max_length:
        raise SampleRejected(TOO_LONG, f"length {length} > max_length {max_length}")
    return length
