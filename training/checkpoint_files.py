"""The file formats of a checkpoint, written durably and read safely.

JSON written atomically (temp file, fsync, rename) with secrets scrubbed; sha256 of a file; tensors as safetensors
(no pickle, so loading runs no code); `torch.load` restricted to `weights_only=True` for files we did not write.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Mapping

import torch
from safetensors.torch import load_file, save_file

from .secret_scrub import scrub_secrets
from .weights_files import CorruptFileError


def fsync_dir(path: Path) -> None:
    """Make a rename/creation inside `path` durable (the directory entry, not just the file data)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_json(path: str | os.PathLike, obj: Any) -> Path:
    """Write `obj` as JSON, secrets scrubbed, atomically (temp file, fsync, rename): a reader sees old or new."""
    path = Path(path)
    text = json.dumps(scrub_secrets(obj), indent=2, sort_keys=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)
    return path


def read_json(path: str | os.PathLike) -> Any:
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{path}: not valid JSON: {err}") from err


def sha256_file(path: Path, fsync: bool = False) -> str:
    with open(path, "rb") as handle:
        digest = hashlib.file_digest(handle, "sha256").hexdigest()
        if fsync:  # fsync through a read-only descriptor flushes the file's dirty pages on Linux
            os.fsync(handle.fileno())
    return digest


def save_tensors(path: str | os.PathLike, tensors: Mapping[str, torch.Tensor],
                 metadata: Mapping[str, str] | None = None) -> Path:
    """Save tensors with safetensors. Each is detached and moved to CPU; non-contiguous tensors, views of a larger
    buffer and tensors sharing storage with another entry (tied weights) are copied, since safetensors refuses
    shared storage. `metadata` (str -> str) goes to the header, secrets scrubbed."""
    path = Path(path)
    prepared: dict[str, torch.Tensor] = {}
    seen_storages: set[int] = set()
    for name, tensor in tensors.items():
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"save_tensors({path}): {name!r} is a {type(tensor).__name__}, not a tensor")
        cpu = tensor.detach().to("cpu")
        storage = cpu.untyped_storage()
        whole_storage = cpu.data_ptr() == storage.data_ptr() and cpu.nbytes == storage.nbytes()
        if not cpu.is_contiguous() or not whole_storage or storage.data_ptr() in seen_storages:
            cpu = cpu.contiguous().clone()
        seen_storages.add(cpu.untyped_storage().data_ptr())
        prepared[name] = cpu
    header = None if metadata is None else {str(k): str(v) for k, v in scrub_secrets(dict(metadata)).items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(prepared, str(path), metadata=header)
    return path


def load_tensors(path: str | os.PathLike, device: str = "cpu") -> dict[str, torch.Tensor]:
    """Load a safetensors file. Anything else (a pickle posing as a checkpoint file) raises ValueError naming the
    file; safetensors reads a JSON header and raw bytes, so no code in the file can run."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"load_tensors: {path} does not exist")
    try:
        return load_file(str(path), device=device)
    except Exception as err:  # SafetensorError: bad header / truncated / not safetensors at all
        raise CorruptFileError(f"load_tensors: {path} is not a valid safetensors file: {err}") from err


def safe_torch_load(path: str | os.PathLike, map_location: str = "cpu") -> Any:
    """`torch.load` restricted to tensors and plain containers (`weights_only=True`), for files we did not write
    (e.g. DeepSpeed's). A pickle that would build arbitrary objects raises ValueError naming the file."""
    path = Path(path)
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as err:  # UnpicklingError (forbidden global) or a corrupt archive
        raise ValueError(f"safe_torch_load: refusing {path}: {err}") from err


__all__ = ["fsync_dir", "load_tensors", "read_json", "safe_torch_load", "save_tensors", "sha256_file", "write_json"]
