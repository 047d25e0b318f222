"""Resuming a checkpoint with the model config it was trained with, or with the differences the recipe names.

A checkpoint's tensors can load into a model built from another config whenever the shapes agree (another
`num_experts_per_tok`, `rope_theta`, router setting ...): the run would then continue as a different model without a
word. So before loading, the checkpoint's model_config.json (written by training/engine_checkpoint.py) is compared with
the live model's config, key by key (sub-configs as dotted keys), and any difference refuses the resume, naming the
keys with both values -- unless the recipe lists the key in `train.resume_allow_config_changes`.
Every rank reads the same file and compares the same config, so every rank takes the same decision.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from torch import nn

from .checkpoint_files import read_json

logger = logging.getLogger(__name__)

# bookkeeping, not the model: where it was loaded from, the library version, the dtype it was saved in (precision
# changes are the checkpoint layout's business: training/engine_checkpoint.py reshards them)
_NOT_THE_MODEL = frozenset({"_name_or_path", "transformers_version", "dtype", "torch_dtype", "_commit_hash",
                            "_attn_implementation_autoset", "architectures", "auto_map"})
_ABSENT = "<absent>"


class ResumeConfigMismatch(ValueError):
    """The checkpoint was trained with another model config."""

    raised_on_every_rank = True  # every rank compares the same files


def _flatten(config: dict, prefix: str = "") -> dict[str, Any]:
    flat = {}
    for key, value in config.items():
        if key in _NOT_THE_MODEL:
            continue
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def config_differences(saved: dict, live: dict) -> dict[str, tuple[Any, Any]]:
    """{dotted key: (saved value, live value)} for every key whose values differ (missing on one side included)."""
    a, b = _flatten(saved), _flatten(live)
    return {key: (a.get(key, _ABSENT), b.get(key, _ABSENT)) for key in sorted(a.keys() | b.keys())
            if a.get(key, _ABSENT) != b.get(key, _ABSENT)}


def check_resume_config(checkpoint: str | Path, model: nn.Module, allowed: Iterable[str] = ()) -> dict:
    """Raise ResumeConfigMismatch when the checkpoint's model config differs from `model`'s in a key not in
    `allowed`; returns the allowed differences (logged). A checkpoint without model_config.json is not checked."""
    from .engine_checkpoint import LAYOUT_FILE
    from .lora import unwrap_model

    checkpoint = Path(checkpoint)
    config_file = read_json(checkpoint / LAYOUT_FILE).get("model_config_file")
    try:
        live = json.loads(unwrap_model(model).config.to_json_string(use_diff=False))
    except TypeError:  # not one of our models (a test's toy model): nothing to compare
        return {}
    if not config_file:
        return {}
    differences = config_differences(read_json(checkpoint / config_file), live)
    allowed = set(allowed)
    refused = {key: values for key, values in differences.items() if key not in allowed}
    if refused:
        listed = "; ".join(f"{key}: checkpoint {a!r}, now {b!r}" for key, (a, b) in refused.items())
        raise ResumeConfigMismatch(
            f"{checkpoint}: trained with another model config ({listed}). Resuming would continue a different "
            "model; restore the config, start a fresh run.output_dir, or list the keys in "
            "train.resume_allow_config_changes to resume anyway")
    if differences:
        logger.warning("%s: resuming with a changed model config, as train.resume_allow_config_changes allows: %s",
                       checkpoint, differences)
    return differences


__all__ = ["ResumeConfigMismatch", "check_resume_config", "config_differences"]
