"""Reading safetensors weights files so that a file that does not decode names itself.

safetensors' own errors ("Error while deserializing header: header too large") name neither the file nor what is
wrong with it; every read of a checkpoint or model folder goes through these instead (training/checkpoint_files.py,
training/engine_checkpoint.py, omni/loading.py).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch


class CorruptFileError(ValueError):
    """A weights file that does not decode (not safetensors, a broken header, truncated data); names the file."""


class SafetensorsFile:
    """`safetensors.safe_open` whose every decode failure is a CorruptFileError naming the file and the reason
    (safetensors' own errors name neither). Reads a JSON header and raw bytes: no code in the file can run.

        with SafetensorsFile(path) as handle:
            tensor = handle.get_tensor(name)
    """

    def __init__(self, path: str | os.PathLike):
        from safetensors import safe_open

        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"{self.path}: no such weights file")
        try:
            self._handle = safe_open(str(self.path), framework="pt", device="cpu").__enter__()
        except Exception as err:  # SafetensorError and friends: not safetensors, bad header
            raise CorruptFileError(f"{self.path}: not a readable safetensors file ({err})") from None

    def keys(self) -> list[str]:
        return list(self._handle.keys())

    def get_tensor(self, name: str) -> torch.Tensor:
        try:
            return self._handle.get_tensor(name)
        except Exception as err:  # e.g. data cut short after a valid header
            raise CorruptFileError(f"{self.path}: tensor {name!r} does not decode ({err})") from None

    def close(self) -> None:
        self._handle.__exit__(None, None, None)

    def __enter__(self) -> SafetensorsFile:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def check_safetensors_files(folder: str | os.PathLike) -> None:
    """Open the header of every *.safetensors under `folder` (cheap: no tensor is read): CorruptFileError names
    the first that does not decode, before a loader that would not name it reads them."""
    for path in sorted(Path(folder).rglob("*.safetensors")):
        SafetensorsFile(path).close()


__all__ = ["CorruptFileError", "SafetensorsFile", "check_safetensors_files"]
