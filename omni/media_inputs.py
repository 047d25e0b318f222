"""Media attachments from file paths, for inference (`omni chat`): images, audio clips and videos.

    attachment = load_attachment("image", "cat.png", processor)   # raises AttachmentError("cat.png: <reason>")

Decoding goes through `omni_moe.data.media` (the decoders the training data uses), so a file reads the same way in chat as
in a shard. A video is an .mp4/.webm/... container (PyAV) or a folder of frame images (in natural name order:
frame2.png before frame10.png). Audio is resampled to the processor's feature-extractor rate.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omni_moe.data.media import (
    AUDIO_EXTENSIONS,
    IMAGE_EXTENSIONS,
    VIDEO_CONTAINER_EXTENSIONS,
    decode_audio,
    decode_image,
    decode_video_container,
    decode_video_frames,
    extension,
)
from omni_moe.data.media_files import read_regular_file
from omni_moe.data.quality import MediaDecoderUnavailable, SampleRejected

MEDIA_KINDS = ("image", "audio", "video")
# Inline attachment markers inside a message: <image:PATH>, <audio:PATH>, <video:PATH> (PATH may hold spaces,
# not '>').
INLINE_MARKER = re.compile(r"<(image|audio|video):([^<>]+)>")
BUFFER_REPR = re.compile(r" ?<_io\.BytesIO object at 0x[0-9a-fA-F]+>")


class AttachmentError(ValueError):
    """A path that cannot be attached; str() is "PATH: reason"."""

    def __init__(self, path: str | Path, reason: str):
        super().__init__(f"{path}: {reason}")
        self.path = str(path)
        self.reason = reason


@dataclass
class Attachment:
    kind: str  # "image" | "audio" | "video"
    path: str
    data: Any  # PIL image | mono float32 array at the feature extractor's rate | list of PIL frames
    fps: float | None = None  # videos: the container's frame rate; None = the processor's default

    def describe(self) -> str:
        if self.kind == "image":
            return f"image {self.path} ({self.data.width}x{self.data.height})"
        if self.kind == "audio":
            return f"audio {self.path} ({len(self.data)} samples)"
        rate = f", {self.fps:g} fps" if self.fps else ""
        return f"video {self.path} ({len(self.data)} frames{rate})"


def _natural_key(path: Path) -> list:
    return [int(piece) if piece.isdigit() else piece.lower() for piece in re.split(r"(\d+)", path.name)]


def _read_bytes(path: Path) -> bytes:
    """A regular file within the size cap of the decode contract (data/media_files.py): a FIFO or device never
    blocks the chat. Raises SampleRejected, turned into AttachmentError by the caller."""
    return read_regular_file(path, "the file")


def _supported(kind: str) -> str:
    if kind == "image":
        return ", ".join(sorted(IMAGE_EXTENSIONS))
    if kind == "audio":
        return ", ".join(sorted(AUDIO_EXTENSIONS))
    return ", ".join(sorted(VIDEO_CONTAINER_EXTENSIONS)) + " or a folder of frame images"


def load_attachment(kind: str, path: str | Path, processor) -> Attachment:
    """Decode the file at `path` as `kind` for `processor`; AttachmentError names the path and the reason."""
    if kind not in MEDIA_KINDS:
        raise AttachmentError(path, f"unknown attachment kind {kind!r}; expected one of {MEDIA_KINDS}")
    shown = str(path)
    path = Path(path).expanduser()
    if "\x00" in str(path) or not path.exists():
        raise AttachmentError(shown, "no such file or directory")
    suffix = extension(path.name)
    if path.is_dir() and kind != "video":
        raise AttachmentError(shown, f"is a folder; an {kind} must be a file ({_supported(kind)})")
    try:
        if kind == "image":
            if suffix not in IMAGE_EXTENSIONS:
                raise AttachmentError(shown, f"unsupported image extension {suffix!r} (supported: {_supported(kind)})")
            return Attachment(kind, shown, decode_image(_read_bytes(path), "the file"))
        if kind == "audio":
            if suffix not in AUDIO_EXTENSIONS:
                raise AttachmentError(shown, f"unsupported audio extension {suffix!r} (supported: {_supported(kind)})")
            extractor = getattr(processor, "feature_extractor", None)
            if extractor is None:
                raise AttachmentError(shown, "this model has no audio encoder")
            samples, _ = decode_audio(_read_bytes(path), "the file", target_rate=extractor.sampling_rate)
            return Attachment(kind, shown, samples)
        if path.is_dir():
            frame_files = sorted((f for f in path.iterdir() if f.is_file() and extension(f.name) in IMAGE_EXTENSIONS),
                                 key=_natural_key)
            if not frame_files:
                raise AttachmentError(shown, f"folder holds no frame images ({', '.join(sorted(IMAGE_EXTENSIONS))})")
            frames = decode_video_frames([_read_bytes(f) for f in frame_files], "the folder")
            return Attachment(kind, shown, frames)
        if suffix not in VIDEO_CONTAINER_EXTENSIONS:
            raise AttachmentError(shown, f"unsupported video extension {suffix!r} (supported: {_supported(kind)})")
        frames, fps = decode_video_container(_read_bytes(path), "the file")
        return Attachment(kind, shown, frames, fps)
    except SampleRejected as exc:
        # decoders read from memory; PIL names the buffer object, which tells the user nothing
        raise AttachmentError(shown, BUFFER_REPR.sub("", exc.detail)) from None
    except MediaDecoderUnavailable as exc:
        raise AttachmentError(shown, str(exc)) from None


def split_inline_markers(text: str) -> list[tuple[str, str]]:
    """'see <image:a.png> and' -> [("text", "see "), ("image", "a.png"), ("text", " and")] (empty text dropped)."""
    pieces: list[tuple[str, str]] = []
    position = 0
    for match in INLINE_MARKER.finditer(text):
        if match.start() > position:
            pieces.append(("text", text[position:match.start()]))
        pieces.append((match.group(1), match.group(2).strip()))
        position = match.end()
    if position < len(text):
        pieces.append(("text", text[position:]))
    return pieces


__all__ = ["INLINE_MARKER", "MEDIA_KINDS", "Attachment", "AttachmentError", "load_attachment", "split_inline_markers"]
