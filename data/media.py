"""Media decoding from bytes: images (PIL, RGB), audio (soundfile, fallback `wave`; mono; resampled),
video (frame images, or a container file through PyAV when installed).

The decode contract, one for every caller (`omni data build`, the shard reader, `omni eval`, `omni chat`, and any
server decoding request media: these functions are public for that): `decode_image`, `decode_audio`,
`decode_video_frames` and `decode_video_container` take the bytes and a `MediaLimits` (DEFAULT_LIMITS unless given)
and either return bounded output or raise `SampleRejected` with one reason -- every decoder exception, whatever
library raised it, becomes one. Bounds: audio sampling rates within [min_audio_rate, max_audio_rate] Hz (a 0 Hz
header would divide by zero when resampling, a 1 Hz one expand 16,000x) and at most max_audio_seconds; images at
most max_image_pixels (checked from the header, before decoding); videos keep at most max_video_frames frames,
sampled evenly while decoding (memory holds at most 2x that many). Files are read by data/media_files.py (regular
files under the media root only). `MediaDecoderUnavailable` is a missing optional decoder (an environment
problem). Nothing here ever unpickles: the member formats we decode are image, audio and video codecs only.
"""

from __future__ import annotations

import io
import wave
from dataclasses import dataclass

import numpy as np
from PIL import Image

from .quality import (
    AUDIO_DECODE,
    EMPTY_AUDIO,
    EMPTY_VIDEO,
    IMAGE_DECODE,
    MEDIA_TOO_LARGE,
    VIDEO_DECODE,
    MediaDecoderUnavailable,
    SampleRejected,
)

IMAGE_EXTENSIONS = frozenset({"png", "jpg", "jpeg", "webp", "bmp", "gif", "tif", "tiff"})
AUDIO_EXTENSIONS = frozenset({"wav", "flac", "ogg", "mp3"})
VIDEO_CONTAINER_EXTENSIONS = frozenset({"mp4", "avi", "mkv", "webm", "mov", "m4v"})
# Formats that can carry pickled Python objects (torch.save, joblib, numpy object arrays,
# webdataset's "pyd"). Shard members with these extensions are rejected and never read.
PICKLE_EXTENSIONS = frozenset({"pkl", "pickle", "pyd", "pth", "pt", "ckpt", "joblib", "npy", "npz"})


@dataclass(frozen=True)
class MediaLimits:
    """Caps of the decode contract (see the module docstring). The defaults fit training data and chat; a server
    may pass tighter ones."""

    max_file_bytes: int = 512 * 1024 * 1024
    max_image_pixels: int = 50_000_000  # ~7000 x 7000
    min_audio_rate: int = 1000  # Hz
    max_audio_rate: int = 384_000  # Hz
    max_audio_seconds: float = 1800.0
    max_video_frames: int = 256


DEFAULT_LIMITS = MediaLimits()
DEFAULT_AUDIO_RATE = 16000  # Whisper's rate: what the reader resamples to unless told otherwise


def extension(name: str) -> str:
    """Lower-case last extension of a file or member name ('' when there is none)."""
    base = name.rsplit("/", 1)[-1]
    return base.rsplit(".", 1)[-1].lower() if "." in base else ""


def decode_image(data: bytes, what: str, *, reason: str = IMAGE_DECODE,
                 limits: MediaLimits = DEFAULT_LIMITS) -> Image.Image:
    """Fully decode (so a truncated file fails here, not later in the processor) and convert to RGB."""
    if not data:
        raise SampleRejected(reason, f"{what} is a zero-byte file")
    try:
        with Image.open(io.BytesIO(data)) as image:
            width, height = image.size  # from the header: refuse before decoding a pixel bomb
            if width * height > limits.max_image_pixels:
                raise SampleRejected(MEDIA_TOO_LARGE, f"{what} is {width}x{height} pixels, over the "
                                                      f"{limits.max_image_pixels}-pixel limit")
            image.load()
            return image.convert("RGB")
    except SampleRejected:
        raise
    except Exception as exc:  # PIL raises many types for bad data (OSError, SyntaxError, ValueError, bombs, ...)
        raise SampleRejected(reason, f"{what} does not decode as an image ({type(exc).__name__}: {exc})") from None


def _read_with_soundfile(data: bytes, what: str, limits: MediaLimits) -> tuple[np.ndarray, int]:
    import soundfile

    with soundfile.SoundFile(io.BytesIO(data)) as handle:
        rate = int(handle.samplerate)
        _check_audio_header(rate, handle.frames, what, limits)
        samples = handle.read(frames=_max_frames(rate, limits), dtype="float32", always_2d=True)
    return samples, rate


def _check_audio_header(rate: int, frames: int, what: str, limits: MediaLimits) -> None:
    if not limits.min_audio_rate <= rate <= limits.max_audio_rate:
        raise SampleRejected(AUDIO_DECODE, f"{what} declares a sampling rate of {rate} Hz, outside "
                                           f"[{limits.min_audio_rate}, {limits.max_audio_rate}] Hz")
    if frames > _max_frames(rate, limits):
        raise SampleRejected(MEDIA_TOO_LARGE, f"{what} is {frames / rate:.1f} s long, over the "
                                              f"{limits.max_audio_seconds:g}-second limit")


def _max_frames(rate: int, limits: MediaLimits) -> int:
    return int(limits.max_audio_seconds * rate)


def _read_with_wave(data: bytes, what: str, limits: MediaLimits) -> tuple[np.ndarray, int]:
    """PCM WAV through the standard library, for machines without libsndfile."""
    with wave.open(io.BytesIO(data), "rb") as reader:
        channels, width, rate = reader.getnchannels(), reader.getsampwidth(), reader.getframerate()
        _check_audio_header(rate, reader.getnframes(), what, limits)
        raw = reader.readframes(min(reader.getnframes(), _max_frames(rate, limits)))
    if width == 1:
        samples = (np.frombuffer(raw, dtype=np.uint8).astype(np.float32) - 128.0) / 128.0
    elif width == 2:
        samples = np.frombuffer(raw, dtype="<i2").astype(np.float32) / 32768.0
    elif width == 3:
        triplets = np.frombuffer(raw, dtype=np.uint8).reshape(-1, 3).astype(np.int32)
        ints = triplets[:, 0] | (triplets[:, 1] << 8) | (triplets[:, 2] << 16)
        samples = (np.where(ints >= 1 << 23, ints - (1 << 24), ints)).astype(np.float32) / float(1 << 23)
    elif width == 4:
        samples = np.frombuffer(raw, dtype="<i4").astype(np.float32) / float(1 << 31)
    else:
        raise ValueError(f"unsupported WAV sample width {width} bytes")
    return samples.reshape(-1, channels), rate


def resample_audio(samples: np.ndarray, orig_rate: int, target_rate: int) -> np.ndarray:
    """Band-limited resampling of a 1-D signal via the FFT (ideal low-pass when downsampling).

    Treats the clip as one period, so the edges may ring slightly; exact for periodic content.
    """
    if orig_rate == target_rate:
        return samples
    n_in = samples.shape[0]
    n_out = max(1, int(round(n_in * target_rate / orig_rate)))
    spectrum = np.fft.rfft(samples.astype(np.float64))
    keep = min(spectrum.shape[0], n_out // 2 + 1)
    out_spectrum = np.zeros(n_out // 2 + 1, dtype=np.complex128)
    out_spectrum[:keep] = spectrum[:keep]
    return (np.fft.irfft(out_spectrum, n=n_out) * (n_out / n_in)).astype(np.float32)


def decode_audio(data: bytes, what: str, *, target_rate: int | None = None,
                 limits: MediaLimits = DEFAULT_LIMITS) -> tuple[np.ndarray, int]:
    """Bytes -> (mono float32 samples in [-1, 1], sampling rate), resampled to `target_rate` when given. Stereo is
    averaged to mono. The sampling rate and duration are checked from the header before the samples are read."""
    if not data:
        raise SampleRejected(AUDIO_DECODE, f"{what} is a zero-byte file")
    if target_rate is not None and not limits.min_audio_rate <= target_rate <= limits.max_audio_rate:
        raise ValueError(f"decode_audio: target_rate {target_rate} Hz is outside [{limits.min_audio_rate}, "
                         f"{limits.max_audio_rate}] Hz")
    errors = []
    for reader in (_read_with_soundfile, _read_with_wave):
        try:
            samples, rate = reader(data, what, limits)
            break
        except SampleRejected:
            raise  # the header was read and is out of bounds: the other reader would read the same header
        except Exception as exc:  # any reader failure means "try the next one"; both failing is the verdict
            errors.append(f"{reader.__name__.removeprefix('_read_with_')}: {exc}")
    else:
        raise SampleRejected(AUDIO_DECODE, f"{what} does not decode as audio ({'; '.join(errors)})")
    mono = samples.mean(axis=1, dtype=np.float32) if samples.shape[1] > 1 else samples[:, 0]
    if mono.shape[0] == 0:
        raise SampleRejected(EMPTY_AUDIO, f"{what} holds 0 audio samples")
    if not np.isfinite(mono).all():
        raise SampleRejected(AUDIO_DECODE, f"{what} contains NaN/inf samples")
    if target_rate is not None and rate != target_rate:
        try:
            mono, rate = resample_audio(mono, rate, target_rate), target_rate
        except Exception as exc:  # numpy errors on a degenerate signal: this sample's problem, counted
            raise SampleRejected(AUDIO_DECODE, f"{what} cannot be resampled {rate} -> {target_rate} Hz "
                                               f"({type(exc).__name__}: {exc})") from None
    return np.ascontiguousarray(mono, dtype=np.float32), rate


def decode_video_frames(frames: list[bytes], what: str, *, limits: MediaLimits = DEFAULT_LIMITS) -> list[Image.Image]:
    """A video stored as frame images -> list of RGB frames (at most `limits.max_video_frames`, evenly spaced)."""
    if not frames:
        raise SampleRejected(EMPTY_VIDEO, f"{what} has 0 frames")
    keep = evenly_spaced(len(frames), limits.max_video_frames)
    return [decode_image(frames[i], f"{what} frame {i}", reason=VIDEO_DECODE, limits=limits) for i in keep]


def evenly_spaced(count: int, most: int) -> list[int]:
    """`min(count, most)` indices spread evenly over range(count), first and last included."""
    if count <= most:
        return list(range(count))
    if most == 1:
        return [0]
    return [round(i * (count - 1) / (most - 1)) for i in range(most)]


def have_video_container_decoder() -> bool:
    try:
        import av  # noqa: F401
    except ImportError:
        return False
    return True


def _iso_media_truncation(data: bytes) -> str | None:
    """Why an mp4/mov/m4v file is cut short, or None if its top-level boxes are complete (or it is
    not ISO media). Needed because FFmpeg treats a cut-off `mdat` as the end of the stream: a
    truncated file would decode to its first few frames without any error."""
    if data[4:8] != b"ftyp":
        return None
    position = 0
    while position + 8 <= len(data):
        size, header = int.from_bytes(data[position:position + 4], "big"), 8
        if size == 1:  # 64-bit size follows the box type
            if position + 16 > len(data):
                return f"the box header at byte {position} is cut off"
            size, header = int.from_bytes(data[position + 8:position + 16], "big"), 16
        elif size == 0:  # "runs to the end of the file": nothing to check
            return None
        if size < header:  # not a layout we understand; leave the verdict to FFmpeg
            return None
        if position + size > len(data):
            box = data[position + 4:position + 8].decode("latin-1")
            return (f"its {box!r} box at byte {position} declares {size} bytes but only "
                    f"{len(data) - position} remain (truncated file)")
        position += size
    return None


def decode_video_container(data: bytes, what: str, *,
                           limits: MediaLimits = DEFAULT_LIMITS) -> tuple[list[Image.Image], float | None]:
    """An mp4/webm/... file -> (RGB frames, fps) through PyAV. Raises `MediaDecoderUnavailable`
    naming the sample when PyAV is not installed.

    At most `limits.max_video_frames` frames are kept, evenly spaced, sampled while decoding (`_FrameSampler`),
    and the fps returned is then the kept frames' rate, so their timestamps stay right.

    A cut-off or unreadable file is `VIDEO_DECODE`; `EMPTY_VIDEO` is kept for a well-formed file
    that really holds no video frames (e.g. audio only)."""
    try:
        import av
    except ImportError:
        raise MediaDecoderUnavailable(
            f"{what} is a video container file; decoding it needs PyAV (`pip install av`, the 'video' "
            f"extra), which is not installed. Install it, or store the video as frame images."
        ) from None
    if not data:
        raise SampleRejected(VIDEO_DECODE, f"{what} is a zero-byte file")
    truncation = _iso_media_truncation(data)
    if truncation is not None:
        raise SampleRejected(VIDEO_DECODE, f"{what}: {truncation}")
    try:
        with av.open(io.BytesIO(data)) as container:
            if not container.streams.video:
                kinds = ", ".join(sorted({stream.type for stream in container.streams})) or "none"
                if not container.streams.audio:  # FFmpeg opens some cut-off files as bare 'data' streams
                    raise SampleRejected(VIDEO_DECODE, f"{what} has no audio or video stream (streams: {kinds}); "
                                                       f"truncated or not a video file")
                raise SampleRejected(EMPTY_VIDEO, f"{what} has no video stream (only {kinds})")
            stream = container.streams.video[0]
            fps = float(stream.average_rate) if stream.average_rate else None
            declared = stream.frames  # from the container header; 0 when the format does not say
            sampler = _FrameSampler(limits.max_video_frames)
            for frame in container.decode(stream):
                sampler.offer(frame, limits, what)
            frames, decoded = sampler.frames(), sampler.seen
    except SampleRejected:
        raise
    except Exception as exc:  # PyAV raises a family of FFmpeg errors; all mean "corrupt container"
        raise SampleRejected(VIDEO_DECODE, f"{what} does not decode as video ({exc})") from None
    if not frames:
        if declared:
            raise SampleRejected(VIDEO_DECODE, f"{what} declares {declared} frames but none decodes (corrupt file)")
        raise SampleRejected(EMPTY_VIDEO, f"{what} has 0 frames")
    if fps is not None and decoded > len(frames):
        fps = fps * (len(frames) - 1) / max(decoded - 1, 1) if len(frames) > 1 else fps / decoded
    return frames, fps


class _FrameSampler:
    """Keeps at most `most` evenly spaced frames of a stream of unknown length, holding at most 2 x `most`: every
    `stride`-th frame is kept, and when the buffer fills, every other kept frame is dropped and the stride
    doubles. Frames are converted to RGB images only when kept."""

    def __init__(self, most: int):
        self.most, self.stride, self.seen = max(1, most), 1, 0
        self.kept: list[Image.Image] = []

    def offer(self, frame, limits: MediaLimits, what: str) -> None:
        index, self.seen = self.seen, self.seen + 1
        if index % self.stride:
            return
        if frame.width * frame.height > limits.max_image_pixels:
            raise SampleRejected(MEDIA_TOO_LARGE, f"{what} frames are {frame.width}x{frame.height} pixels, over the "
                                                  f"{limits.max_image_pixels}-pixel limit")
        self.kept.append(frame.to_image().convert("RGB"))
        if len(self.kept) >= 2 * self.most:
            self.kept, self.stride = self.kept[::2], self.stride * 2

    def frames(self) -> list[Image.Image]:
        return [self.kept[i] for i in evenly_spaced(len(self.kept), self.most)]
