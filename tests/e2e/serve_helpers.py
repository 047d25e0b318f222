"""Shared pieces of the `omni serve` tests: a tiny model folder, a live server in a thread, synthetic media."""

from __future__ import annotations

import base64
import contextlib
import io
from pathlib import Path

import av
import numpy as np
import soundfile
import torch
from PIL import Image

from omni.cli import build_parser
from omni.serve import build_server, running_server
from tests.tiny import save_tiny_omni_folder


def save_serve_model(path: Path) -> Path:
    """The tiny random omni folder with its weights nudged off their small init: untrained logits are near-uniform
    and make greedy answers fragile to compare (as in tests/unit/test_generate_media.py); nudged, the model also ends
    some answers with its end-of-turn token, so both finish reasons occur."""
    from omni_moe.modeling.modeling_omni import OmniMoeForCausalLM

    save_tiny_omni_folder(path)
    model = OmniMoeForCausalLM.from_pretrained(str(path))
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=generator) * 0.05)
    model.save_pretrained(str(path))
    return path


@contextlib.contextmanager
def live_server(argv: list[str]):
    """`omni serve ARGV` in this process: uvicorn in a thread on a free loopback port. Yields (base_url, engine,
    settings); always shuts the server and the generation worker down."""
    engine, app, settings = build_server(build_parser().parse_args(["serve", *argv]))
    try:
        with running_server(app) as url:
            yield url, engine, settings
    finally:
        engine.close()


# ------------------------------------------------------------------------------------------------ synthetic media
def png_bytes(seed: int = 0, size: tuple[int, int] = (40, 48), fmt: str = "PNG") -> bytes:
    rng = np.random.default_rng(seed)
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (*size, 3), dtype=np.uint8)).save(buffer, format=fmt)
    return buffer.getvalue()


def audio_bytes(fmt: str = "WAV", rate: int = 8000) -> bytes:
    buffer = io.BytesIO()
    soundfile.write(buffer, (0.3 * np.sin(np.arange(4000) / 3)).astype(np.float32), rate, format=fmt)
    return buffer.getvalue()


def mp4_bytes(frames: int = 4, size: int = 32) -> bytes:
    buffer = io.BytesIO()
    with av.open(buffer, "w", format="mp4") as container:
        stream = container.add_stream("mpeg4", rate=8)
        stream.width = stream.height = size
        stream.pix_fmt = "yuv420p"
        for i in range(frames):
            pixels = np.full((size, size, 3), 40 * i, dtype=np.uint8)
            container.mux(stream.encode(av.VideoFrame.from_ndarray(pixels, format="rgb24")))
        container.mux(stream.encode())
    return buffer.getvalue()


def data_url(data: bytes, mime: str) -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()
