"""Rendering the synthetic dataset's media (`omni_moe.data.synth`): what a planned sample's `render` parameters look like as
files -- a shape on a 32 px canvas, a moving shape's video frames, DTMF-like digit tones.

Every function here is a pure function of its `render` mapping (drawn by `omni_moe.data.synth.plan_sample`), so the same plan
gives byte-identical files: no antialiasing, PNGs with fixed parameters and no time chunk, WAVs without timestamps.
"""

from __future__ import annotations

import wave
from pathlib import Path
from typing import Any, Mapping

import numpy as np
from PIL import Image, ImageDraw

SHAPES = ("circle", "square", "triangle", "cross")
# Hues spread around the colour wheel (~40-70 degrees apart) so a 32 px patch is unambiguous.
COLOURS = {
    "red": (220, 30, 30),
    "yellow": (235, 215, 25),
    "green": (30, 185, 45),
    "cyan": (25, 205, 215),
    "blue": (35, 65, 235),
    "purple": (155, 45, 215),
}

SAMPLE_RATE = 16000
# DTMF-like keypad: digit -> (low tone, high tone). Real DTMF tones are ~70 Hz apart; these are
# >= 200 Hz (low group) and >= 650 Hz (high group) apart, several 80-bin log-mel bins each.
LOW_TONES_HZ = (450.0, 650.0, 900.0, 1250.0)
HIGH_TONES_HZ = (1750.0, 2400.0, 3300.0)
DIGIT_TONES = {
    str(d): (LOW_TONES_HZ[(d - 1) // 3], HIGH_TONES_HZ[(d - 1) % 3]) for d in range(1, 10)
} | {"0": (LOW_TONES_HZ[3], HIGH_TONES_HZ[1])}
FADE_SECONDS = 0.008  # raised-cosine edges: no clicks smearing energy over all frequencies
NOISE_STD = 0.003


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, x0: int, y0: int, size: int, fill) -> None:
    """Draw `shape` filling the box [x0, x0 + size) x [y0, y0 + size), without antialiasing."""
    x1, y1 = x0 + size - 1, y0 + size - 1
    if shape == "circle":
        draw.ellipse((x0, y0, x1, y1), fill=fill)
    elif shape == "square":
        draw.rectangle((x0, y0, x1, y1), fill=fill)
    elif shape == "triangle":
        draw.polygon([((x0 + x1) / 2, y0), (x0, y1), (x1, y1)], fill=fill)
    elif shape == "cross":
        bar = max(2, round(size / 3))
        lo = x0 + (size - bar) // 2
        top = y0 + (size - bar) // 2
        draw.rectangle((lo, y0, lo + bar - 1, y1), fill=fill)
        draw.rectangle((x0, top, x1, top + bar - 1), fill=fill)
    else:
        raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")


def _canvas(size: int, background: int) -> tuple[Image.Image, ImageDraw.ImageDraw]:
    image = Image.new("RGB", (size, size), (background,) * 3)
    return image, ImageDraw.Draw(image)


def render_image(render: Mapping[str, Any], image_size: int) -> Image.Image:
    image, draw = _canvas(image_size, render["background"])
    _draw_shape(draw, render["shape"], render["x0"], render["y0"], render["size"], tuple(render["rgb"]))
    return image


def render_video(render: Mapping[str, Any], image_size: int) -> list[Image.Image]:
    frames = []
    for x0, y0 in render["path"]:
        image, draw = _canvas(image_size, render["background"])
        _draw_shape(draw, render["shape"], x0, y0, render["size"], tuple(render["rgb"]))
        frames.append(image)
    return frames


def synth_digit_audio(render: Mapping[str, Any]) -> np.ndarray:
    """int16 waveform at SAMPLE_RATE: lead silence, then one two-tone burst per digit with gaps."""
    total = render["num_samples"]
    wave_f = np.zeros(total, dtype=np.float64)
    fade = int(FADE_SECONDS * SAMPLE_RATE)
    ramp = 0.5 - 0.5 * np.cos(np.linspace(0.0, np.pi, fade))
    for tone in render["tones"]:
        n = tone["length"]
        t = np.arange(n) / SAMPLE_RATE
        low, high = DIGIT_TONES[tone["digit"]]
        burst = 0.5 * np.sin(2 * np.pi * low * t + tone["phase"][0]) + 0.5 * np.sin(2 * np.pi * high * t + tone["phase"][1])
        envelope = np.ones(n)
        envelope[:fade], envelope[n - fade:] = ramp, ramp[::-1]
        wave_f[tone["start"]:tone["start"] + n] += tone["amplitude"] * burst * envelope
    wave_f += np.random.default_rng(render["noise_seed"]).normal(0.0, NOISE_STD, total)
    return np.round(np.clip(wave_f, -1.0, 1.0) * 32767).astype("<i2")


def write_wav(path: Path, samples: np.ndarray) -> None:
    """16-bit mono PCM WAV via the standard library (no timestamps: byte-identical per content)."""
    with wave.open(str(path), "wb") as handle:
        handle.setnchannels(1)
        handle.setsampwidth(2)
        handle.setframerate(SAMPLE_RATE)
        handle.writeframes(samples.astype("<i2").tobytes())


def save_png(image: Image.Image, path: Path) -> None:
    image.save(path, format="PNG", compress_level=6)  # fixed params; PIL adds no time chunk


__all__ = [
    "COLOURS", "DIGIT_TONES", "HIGH_TONES_HZ", "LOW_TONES_HZ", "SAMPLE_RATE", "SHAPES", "render_image", "render_video",
    "save_png", "synth_digit_audio", "write_wav",
]
