"""Reading media files: the file half of the decode contract (data/media.py decodes the bytes).

    data = read_media_file(media_root, "images/cat.png", "images[0]", limits)   # manifests, datasets
    data = read_regular_file(Path("~/cat.png").expanduser(), "the file", limits)   # chat / request attachments

A media path from a manifest is relative, without '..', backslashes or NUL bytes, and must resolve (symlinks
followed) to a regular file inside the media root: a symlink pointing outside it, a FIFO (which would block the
reader forever), a device or a folder is rejected, as is a file over `limits.max_file_bytes`. The file is opened
non-blocking and checked again on the open descriptor, so a path swapped for a FIFO after the check cannot block
either. Every failure is a `SampleRejected` with its reason (counted by the caller's DropPolicy).
"""

from __future__ import annotations

import os
import stat
from pathlib import Path, PurePosixPath

from .media import DEFAULT_LIMITS, MediaLimits
from .quality import MEDIA_TOO_LARGE, MISSING_MEDIA, UNSAFE_PATH, SampleRejected


def media_path(media_root: Path, relative: str, what: str) -> Path:
    """`relative` under `media_root`, resolved (symlinks followed); SampleRejected(UNSAFE_PATH) when it is not a
    plain relative path or resolves outside the root."""
    if not isinstance(relative, str) or "\x00" in relative:
        raise SampleRejected(UNSAFE_PATH, f"{what} path {relative!r} contains a NUL byte or is not a string")
    pure = PurePosixPath(relative)
    if pure.is_absolute() or ".." in pure.parts or "\\" in relative:
        raise SampleRejected(UNSAFE_PATH, f"{what} path {relative!r} must be relative to the media root, without '..'")
    root = Path(media_root).resolve()
    resolved = root.joinpath(*pure.parts).resolve()
    if not resolved.is_relative_to(root):
        raise SampleRejected(UNSAFE_PATH, f"{what} path {relative!r} resolves to {resolved}, outside the media root "
                                          f"{root} (a symlink pointing out of it)")
    return resolved


def read_regular_file(path: Path, what: str, limits: MediaLimits = DEFAULT_LIMITS) -> bytes:
    """The bytes of `path` when it is a regular file no larger than `limits.max_file_bytes`."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        raise SampleRejected(MISSING_MEDIA, f"{what} {str(path)!r} does not exist") from None
    except (OSError, ValueError) as exc:
        raise SampleRejected(MISSING_MEDIA, f"{what} {str(path)!r} cannot be opened ({exc})") from None
    with os.fdopen(fd, "rb") as handle:
        info = os.fstat(handle.fileno())
        if not stat.S_ISREG(info.st_mode):
            kind = "a FIFO" if stat.S_ISFIFO(info.st_mode) else "a folder" if stat.S_ISDIR(info.st_mode) else \
                "a device or special file"
            raise SampleRejected(UNSAFE_PATH, f"{what} {str(path)!r} is {kind}, not a regular file")
        if info.st_size > limits.max_file_bytes:
            raise SampleRejected(MEDIA_TOO_LARGE, f"{what} {str(path)!r} is {info.st_size} bytes, over the "
                                                  f"{limits.max_file_bytes}-byte limit")
        data = handle.read(limits.max_file_bytes + 1)
    if len(data) > limits.max_file_bytes:  # grew while being read
        raise SampleRejected(MEDIA_TOO_LARGE, f"{what} {str(path)!r} is over the {limits.max_file_bytes}-byte limit")
    return data


def read_media_file(media_root: Path, relative: str, what: str, limits: MediaLimits = DEFAULT_LIMITS) -> bytes:
    """`read_regular_file` of `relative` under `media_root` (see the module docstring)."""
    path = media_path(media_root, relative, what)
    try:
        return read_regular_file(path, what, limits)
    except SampleRejected as exc:  # name the path as the manifest wrote it, not the resolved one
        detail = exc.detail.replace(repr(str(path)), repr(relative))
        if detail.endswith(" does not exist"):
            detail += " under the media root"
        raise SampleRejected(exc.reason, detail) from None


__all__ = ["media_path", "read_media_file", "read_regular_file"]
