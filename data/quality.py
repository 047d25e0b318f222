"""Bad-input policy shared by the shard writer and the reader.

Every rejected sample is dropped under exactly one *reason* (the constants below), logged with
its key and shard, and counted. `DropPolicy.reject` is the single place that decides what
happens next: strict mode raises `BadSampleError`; otherwise the sample is skipped, and once at
least `min_samples` samples were seen a drop rate above `max_drop_rate` raises
`DropRateExceeded`, because a pipeline that quietly drops a large part of its data trains on
a different dataset than the one asked for.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

logger = logging.getLogger(__name__)

# --- reasons (one counter each) -------------------------------------------------------------
MALFORMED_JSON = "malformed_json"        # not JSON / not an object / no .json member in a shard
NON_UTF8 = "non_utf8"                    # bytes that are not UTF-8, or strings with lone surrogates
BAD_SCHEMA = "bad_schema"                # missing or ill-typed fields, unknown roles
BAD_ROLE_ORDER = "bad_role_order"        # not [system] user assistant user assistant ...
EMPTY_ASSISTANT = "empty_assistant"      # an assistant turn with only whitespace
MARKER_MISMATCH = "marker_mismatch"      # number of <image>/<video>/<audio> != number of media
TOO_LONG = "too_long"                    # length_fn(sample) > max_length
DUPLICATE_ID = "duplicate_id"            # two samples map onto one shard key
UNSAFE_PATH = "unsafe_path"              # absolute media path or one escaping the media root
UNSUPPORTED_MEDIA = "unsupported_media"  # a media file extension we do not decode
MISSING_MEDIA = "missing_media"          # media file / shard member referenced but absent
IMAGE_DECODE = "image_decode"            # truncated or corrupt image
AUDIO_DECODE = "audio_decode"            # zero-byte or corrupt audio
EMPTY_AUDIO = "empty_audio"              # audio that decodes to zero samples
VIDEO_DECODE = "video_decode"            # corrupt frame or container
EMPTY_VIDEO = "empty_video"              # a video with zero frames
PICKLE_MEMBER = "pickle_member"          # a shard member in a pickle-based format (never decoded)
SHARD_READ_ERROR = "shard_read_error"    # the tar itself is corrupt/truncated (rest of shard lost)
MEDIA_TOO_LARGE = "media_too_large"      # over a MediaLimits cap: file bytes, image pixels, audio duration
RECORD_TOO_LARGE = "record_too_large"    # a sample's JSON (manifest line or .json member) over MAX_RECORD_BYTES

ALL_REASONS = (
    MALFORMED_JSON, NON_UTF8, BAD_SCHEMA, BAD_ROLE_ORDER, EMPTY_ASSISTANT, MARKER_MISMATCH,
    TOO_LONG, DUPLICATE_ID, UNSAFE_PATH, UNSUPPORTED_MEDIA, MISSING_MEDIA, IMAGE_DECODE,
    AUDIO_DECODE, EMPTY_AUDIO, VIDEO_DECODE, EMPTY_VIDEO, PICKLE_MEMBER, SHARD_READ_ERROR, MEDIA_TOO_LARGE,
    RECORD_TOO_LARGE,
)


class SampleRejected(Exception):
    """Raised by validators/decoders: this sample is bad for `reason`. Caught by the policy."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


class BadSampleError(ValueError):
    """Strict mode: the first bad sample stops the run. The message names sample, shard and reason.

    The constructor accepts a lone message because torch's DataLoader re-raises worker
    exceptions as `type(exc)(message)`; keyword fields are then None but the message survives.
    """

    def __init__(self, message: str, *, key: str | None = None, shard: str | None = None,
                 reason: str | None = None):
        super().__init__(message)
        self.key = key
        self.shard = shard
        self.reason = reason


class DropRateExceeded(RuntimeError):
    """Too many samples were dropped: the data is not what the run was configured for."""


class MediaDecoderUnavailable(RuntimeError):
    """A sample needs an optional decoder that is not installed (an environment problem, so it
    is raised, never counted as bad data: dropping every mp4 silently would change the dataset)."""


@dataclass
class DropCounters:
    """Samples seen / accepted / dropped per reason. Plain ints so it pickles and merges cheaply."""

    seen: int = 0
    accepted: int = 0
    dropped: dict[str, int] = field(default_factory=dict)

    @property
    def num_dropped(self) -> int:
        return sum(self.dropped.values())

    @property
    def drop_rate(self) -> float:
        return self.num_dropped / self.seen if self.seen else 0.0

    def record_accept(self) -> None:
        self.seen += 1
        self.accepted += 1

    def record_drop(self, reason: str) -> None:
        self.seen += 1
        self.dropped[reason] = self.dropped.get(reason, 0) + 1

    def merge(self, other: DropCounters) -> DropCounters:
        merged = DropCounters(self.seen + other.seen, self.accepted + other.accepted, dict(self.dropped))
        for reason, count in other.dropped.items():
            merged.dropped[reason] = merged.dropped.get(reason, 0) + count
        return merged

    def state_dict(self) -> dict:
        return {"seen": self.seen, "accepted": self.accepted, "dropped": dict(sorted(self.dropped.items()))}

    def load_state_dict(self, state: dict) -> None:
        self.seen = int(state["seen"])
        self.accepted = int(state["accepted"])
        self.dropped = {str(k): int(v) for k, v in state["dropped"].items()}

    @classmethod
    def from_state_dict(cls, state: dict) -> DropCounters:
        counters = cls()
        counters.load_state_dict(state)
        return counters

    def as_metrics(self, prefix: str = "data/") -> dict[str, float]:
        """Flat scalars for TensorBoard: seen, accepted, dropped, drop_rate, dropped/<reason>."""
        metrics = {
            f"{prefix}seen": float(self.seen),
            f"{prefix}accepted": float(self.accepted),
            f"{prefix}dropped": float(self.num_dropped),
            f"{prefix}drop_rate": self.drop_rate,
        }
        for reason, count in sorted(self.dropped.items()):
            metrics[f"{prefix}dropped/{reason}"] = float(count)
        return metrics


@dataclass
class DropPolicy:
    """What to do with a bad sample. `max_drop_rate=None` disables the ceiling."""

    strict: bool = False
    max_drop_rate: float | None = 0.05
    min_samples: int = 100

    def __post_init__(self):
        if self.max_drop_rate is not None and not 0.0 <= self.max_drop_rate <= 1.0:
            raise ValueError(f"max_drop_rate must be in [0, 1] or None, got {self.max_drop_rate}")
        if self.min_samples < 1:
            raise ValueError(f"min_samples must be >= 1, got {self.min_samples}")

    def reject(self, counters: DropCounters, error: SampleRejected, *, key: str, shard: str) -> None:
        """Count (and log) one bad sample; raise in strict mode or when the ceiling is crossed."""
        message = f"bad sample {key!r} in {shard}: {error.reason}: {error.detail}"
        if self.strict:
            raise BadSampleError(f"{message} (strict mode)", key=key, shard=shard, reason=error.reason)
        counters.record_drop(error.reason)
        logger.warning("skipping %s", message)
        self.check_ceiling(counters, where=shard)

    def check_ceiling(self, counters: DropCounters, *, where: str) -> None:
        if self.max_drop_rate is None or counters.seen < self.min_samples:
            return
        if counters.drop_rate > self.max_drop_rate:
            reasons = ", ".join(f"{r}={n}" for r, n in sorted(counters.dropped.items()))
            raise DropRateExceeded(
                f"dropped {counters.num_dropped} of {counters.seen} samples "
                f"({counters.drop_rate:.1%} > max_drop_rate {self.max_drop_rate:.1%}) while reading {where}; "
                f"reasons: {reasons}. Fix the data (see the warnings above / index.json 'rejected') "
                f"or raise max_drop_rate deliberately."
            )
