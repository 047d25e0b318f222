"""Per-rank random-number-generator state: capture, restore, and save/load without pickle.

A resumed run must draw the same random numbers (dropout masks, noise, sampling) as the uninterrupted run, so every
rank saves the state of every generator it uses: Python's `random`, NumPy's global generator, torch's CPU generator
and, where present, every CUDA device's generator.

On disk it is ONE safetensors file per rank: torch generator states are uint8 tensors, and the Python and NumPy
states (tuples of ints / arrays) are JSON in the file's text header. Nothing is ever pickled, so loading a state file
can never execute code (a pickle posing as a state file fails to parse as safetensors).
"""

from __future__ import annotations

import json
import logging
import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file

logger = logging.getLogger(__name__)

RNG_FORMAT_VERSION = 1
_TORCH_CPU_KEY = "torch_cpu"
_CUDA_KEY_PREFIX = "torch_cuda_"


def capture_rng_state() -> dict[str, Any]:
    """The current state of every generator, as JSON-able values plus uint8 tensors.

    Keys: "python" (dict), "numpy" (dict), "torch_cpu" (uint8 tensor), "torch_cuda" (list of uint8 tensors, one per
    visible device; empty without CUDA)."""
    version, internal, gauss_next = random.getstate()
    bit_generator, keys, pos, has_gauss, cached_gaussian = np.random.get_state(legacy=True)
    cuda_states = [s.clone() for s in torch.cuda.get_rng_state_all()] if torch.cuda.is_available() else []
    return {
        "python": {"version": version, "internal": list(internal), "gauss_next": gauss_next},
        "numpy": {
            "bit_generator": bit_generator,
            "keys": [int(k) for k in keys],
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached_gaussian),
        },
        "torch_cpu": torch.get_rng_state().clone(),
        "torch_cuda": cuda_states,
    }


def restore_rng_state(state: dict[str, Any]) -> None:
    """Put every generator back to `state` (from `capture_rng_state` or `load_rng_state`).

    CUDA states are restored for as many devices as both the state and this process have; a mismatch (state saved
    with CUDA, resumed without, or a different device count) is logged, since those draws cannot match anyway."""
    missing = {"python", "numpy", "torch_cpu"} - set(state)
    if missing:
        raise ValueError(f"restore_rng_state: state lacks {sorted(missing)} (has {sorted(state)})")
    py = state["python"]
    random.setstate((int(py["version"]), tuple(int(x) for x in py["internal"]), py["gauss_next"]))
    npy = state["numpy"]
    np.random.set_state(
        (
            npy["bit_generator"],
            np.asarray(npy["keys"], dtype=np.uint32),
            int(npy["pos"]),
            int(npy["has_gauss"]),
            float(npy["cached_gaussian"]),
        )
    )
    torch.set_rng_state(state["torch_cpu"].to(dtype=torch.uint8, device="cpu"))
    saved_cuda = list(state.get("torch_cuda", []))
    have_cuda = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if len(saved_cuda) != have_cuda:
        logger.warning(
            "restore_rng_state: state has %d CUDA generator(s), this process has %d device(s); restoring the first %d",
            len(saved_cuda), have_cuda, min(len(saved_cuda), have_cuda),
        )
    for device_index, cuda_state in enumerate(saved_cuda[:have_cuda]):
        torch.cuda.set_rng_state(cuda_state.to(dtype=torch.uint8, device="cpu"), device_index)


def save_rng_state(path: str | os.PathLike) -> Path:
    """Write this process's generator states to `path` (one safetensors file; give each rank its own path)."""
    path = Path(path)
    state = capture_rng_state()
    tensors = {_TORCH_CPU_KEY: state["torch_cpu"].contiguous()}
    for device_index, cuda_state in enumerate(state["torch_cuda"]):
        tensors[f"{_CUDA_KEY_PREFIX}{device_index}"] = cuda_state.cpu().contiguous()
    header = {
        "format": "omni-rng",
        "format_version": str(RNG_FORMAT_VERSION),
        "python": json.dumps(state["python"]),
        "numpy": json.dumps(state["numpy"]),
        "num_cuda": str(len(state["torch_cuda"])),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata=header)
    return path


def load_rng_state(path: str | os.PathLike, restore: bool = True) -> dict[str, Any]:
    """Read a file written by `save_rng_state`; with `restore` (default) also apply it. Returns the state dict.

    Raises ValueError naming the file when it is not an RNG state file (a pickle, a truncated file, another
    safetensors file): safetensors parses only its own header and raw bytes, so nothing in the file can execute."""
    path = Path(path)
    try:
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            header = handle.metadata() or {}
            tensors = {name: handle.get_tensor(name) for name in handle.keys()}
    except FileNotFoundError:
        raise
    except Exception as err:  # safetensors raises its own SafetensorError for unparsable files
        raise ValueError(f"load_rng_state: {path} is not a readable safetensors RNG file: {err}") from err
    if header.get("format") != "omni-rng" or _TORCH_CPU_KEY not in tensors:
        raise ValueError(f"load_rng_state: {path} is a safetensors file but not an RNG state (header {sorted(header)})")
    num_cuda = int(header.get("num_cuda", "0"))
    state = {
        "python": json.loads(header["python"]),
        "numpy": json.loads(header["numpy"]),
        "torch_cpu": tensors[_TORCH_CPU_KEY],
        "torch_cuda": [tensors[f"{_CUDA_KEY_PREFIX}{i}"] for i in range(num_cuda)],
    }
    if restore:
        restore_rng_state(state)
    return state


__all__ = ["capture_rng_state", "restore_rng_state", "save_rng_state", "load_rng_state"]
