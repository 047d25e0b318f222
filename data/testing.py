"""Tiny media files, manifests and hand-made shards for tests and smoke checks (nothing downloaded).

Kept in the package so unit and distributed tests share one implementation.
"""

from __future__ import annotations

import io
import json
import wave
from pathlib import Path

import numpy as np
from PIL import Image
from webdataset import TarWriter


def image_bytes(color: tuple[int, int, int] = (255, 0, 0), size: tuple[int, int] = (8, 8), fmt: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, format=fmt)
    return buffer.getvalue()


def sine(freq: float, rate: int, seconds: float, amplitude: float = 0.5) -> np.ndarray:
    t = np.arange(int(round(rate * seconds))) / rate
    return (amplitude * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def wav_bytes(channels: list[np.ndarray], rate: int) -> bytes:
    """16-bit PCM WAV from one float array per channel (written with the standard `wave` module)."""
    frames = np.stack(channels, axis=1)
    pcm = np.clip(np.round(frames * 32767), -32768, 32767).astype("<i2")
    buffer = io.BytesIO()
    with wave.open(buffer, "wb") as writer:
        writer.setnchannels(len(channels))
        writer.setsampwidth(2)
        writer.setframerate(rate)
        writer.writeframes(pcm.tobytes())
    return buffer.getvalue()


def mp4_bytes(frames: int, fps: int = 8, size: int = 32) -> bytes:
    """An mpeg4 clip of `frames` frames (frame i filled with gray level 6 * i) through PyAV (the 'video' extra)."""
    import av

    buffer = io.BytesIO()
    with av.open(buffer, "w", format="mp4") as container:
        stream = container.add_stream("mpeg4", rate=fps)
        stream.width = stream.height = size
        stream.pix_fmt = "yuv420p"
        for i in range(frames):
            pixels = np.full((size, size, 3), 6 * i % 256, dtype=np.uint8)
            container.mux(stream.encode(av.VideoFrame.from_ndarray(pixels, format="rgb24")))
        container.mux(stream.encode())
    return buffer.getvalue()


def write(path: Path, data: bytes) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return str(path)


def make_manifest(root: Path, *, n_text: int = 2, n_image: int = 2, n_audio: int = 2, n_video: int = 2,
                  prefix: str = "s", name: str = "manifest.jsonl") -> Path:
    """Canonical JSONL manifest + media under `root`; sample i of each kind has distinct content."""
    root.mkdir(parents=True, exist_ok=True)
    samples = []
    for i in range(n_text):
        samples.append({"id": f"{prefix}-text-{i:04d}", "messages": [
            {"role": "user", "content": f"copy: word{i}"}, {"role": "assistant", "content": f"word{i}"}]})
    for i in range(n_image):
        rel = f"images/{i:04d}.png"
        write(root / rel, image_bytes((10 * i % 256, 0, 255 - i % 256)))
        samples.append({"id": f"{prefix}-image-{i:04d}", "images": [rel], "messages": [
            {"role": "system", "content": "be brief"},
            {"role": "user", "content": "<image>\nWhat colour?"}, {"role": "assistant", "content": f"colour {i}"}]})
    for i in range(n_audio):
        rel = f"audio/{i:04d}.wav"
        write(root / rel, wav_bytes([sine(200 + 10 * i, 8000, 0.05)], 8000))
        samples.append({"id": f"{prefix}-audio-{i:04d}", "audios": [rel], "messages": [
            {"role": "user", "content": "<audio>\nTranscribe."}, {"role": "assistant", "content": f"{i}"}]})
    for i in range(n_video):
        frames = [f"videos/{i:04d}/f{j}.png" for j in range(2)]
        for j, rel in enumerate(frames):
            write(root / rel, image_bytes((0, 40 * j, i % 256)))
        samples.append({"id": f"{prefix}-video-{i:04d}", "videos": [frames], "video_fps": [2.0], "messages": [
            {"role": "user", "content": "<video>\nWhich way?"}, {"role": "assistant", "content": f"left {i}"}]})
    manifest = root / name
    manifest.write_text("".join(json.dumps(s) + "\n" for s in samples), encoding="utf-8")
    return manifest


def write_raw_shard(path: Path, samples: list[dict]) -> str:
    """A tar shard from raw member dicts (`{"__key__": k, "json": bytes, "image0.png": bytes, ...}`),
    bypassing every check: for bad-input tests."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as stream, TarWriter(stream, encoder=False, mtime=0) as writer:
        for sample in samples:
            writer.write(sample)
    return str(path)


def sample_json(sample_id: str, content: str = "hi", *, answer: str = "ok", **media) -> bytes:
    """The `.json` member of a shard sample with the given media member names."""
    sample = {"id": sample_id, "messages": [{"role": "user", "content": content},
                                            {"role": "assistant", "content": answer}], **media}
    return json.dumps(sample).encode("utf-8")
