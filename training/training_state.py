"""`TrainingState`: everything besides tensors that a run needs to resume where it stopped, saved as JSON."""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .checkpoint_files import write_json
from .checkpoint_store import FORMAT_VERSION
from .secret_scrub import scrub_secrets


@dataclass
class TrainingState:
    """Everything besides tensors needed to resume exactly where a run stopped (saved as JSON).

    `data_state` is the data loader's JSON-able resume state; `scheduler_state` the LR scheduler's `state_dict()`.
    Tuples come back as lists; dict keys must be strings (JSON would silently turn int keys into strings)."""

    step: int = 0
    epoch: int = 0
    samples_seen: int = 0
    tokens_seen: int = 0
    stage: str = ""
    nonfinite_skips: int = 0
    data_state: dict[str, Any] = field(default_factory=dict)
    scheduler_state: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> str:
        payload = dataclasses.asdict(self)
        _check_json_able(payload, "TrainingState")
        payload["format_version"] = FORMAT_VERSION
        return json.dumps(scrub_secrets(payload), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "TrainingState":
        payload = json.loads(text)
        if not isinstance(payload, dict):
            raise ValueError(f"TrainingState.from_json: expected a JSON object, got {type(payload).__name__}")
        payload.pop("format_version", None)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(payload) - known)
        if unknown:
            raise ValueError(f"TrainingState.from_json: unknown fields {unknown} (saved by a newer version?)")
        return cls(**payload)

    def save(self, path: str | os.PathLike) -> Path:
        return write_json(path, json.loads(self.to_json()))

    @classmethod
    def load(cls, path: str | os.PathLike) -> "TrainingState":
        return cls.from_json(Path(path).read_text(encoding="utf-8"))


def _check_json_able(value: Any, where: str) -> None:
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str):
                raise TypeError(f"{where}: key {key!r} is a {type(key).__name__}; JSON needs string keys")
            _check_json_able(item, f"{where}.{key}")
    elif isinstance(value, (list, tuple)):
        for index, item in enumerate(value):
            _check_json_able(item, f"{where}[{index}]")
    elif not (value is None or isinstance(value, (bool, int, float, str))):
        raise TypeError(f"{where} is a {type(value).__name__}, which JSON cannot hold (save tensors with save_tensors)")


__all__ = ["TrainingState"]
