"""Training stages as data: a `StageSpec` read from a recipe's YAML (`parse_stages`).

A stage names the components it trains (`train:`), the data mixture, optimizer settings and LR schedule, its length
in optimizer steps (`steps:`), MoE routing overrides and optional LoRA settings. Components resolve to parameter
sets of `OmniMoeForCausalLM` in training/freeze.py, which applies a stage to a model; a preset (`alignment`,
`modality_experts`, `mixed_lora`) fills `train` (and `lora`) for the standard progression. Every key is checked
here, and a bad one is a `StageConfigError` naming the stage and the key.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Mapping

from .lora import DEFAULT_LORA_TARGETS, LORA_TARGETS
from .lr_schedule import SCHEDULES

BASE_COMPONENTS = (
    "vision_encoder", "audio_encoder", "image_projector", "audio_projector", "embeddings", "attention", "norms",
    "dense_mlp", "routers", "shared_experts",
)
EXPERT_COMPONENTS = ("inter_experts", "intra_experts")  # plus "intra_experts:<modality>"
COMPONENTS = BASE_COMPONENTS + EXPERT_COMPONENTS + ("lora", "all")
PRESETS = ("dense_pretrain", "alignment", "modality_experts", "mixed_lora")


class StageConfigError(ValueError):
    """A recipe's stage is malformed; the message names the stage and the offending key."""


# ----------------------------------------------------------------------------- the spec
def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _integer(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


# key -> (check, what a valid value is); one table per section, so every message names section.key
_NONNEG = (lambda v: _number(v) and v >= 0, "a non-negative number")
OPTIMIZER_CHECKS = {
    "lr": (lambda v: _number(v) and v > 0, "a positive number"),
    "betas": (lambda v: isinstance(v, tuple) and len(v) == 2 and all(_number(b) and 0 <= b < 1 for b in v),
              "two numbers in [0, 1)"),
    "eps": _NONNEG, "weight_decay": _NONNEG,
    "warmup_steps": (lambda v: _integer(v) and v >= 0, "a non-negative integer"),
    "min_lr_ratio": (lambda v: _number(v) and 0 <= v <= 1, "a number in [0, 1]"),
    "schedule": (lambda v: v in SCHEDULES, " or ".join(repr(s) for s in SCHEDULES)),
    "grad_clip": (lambda v: v is None or (_number(v) and v > 0), "a positive number or null"),
    "router_lr_scale": (lambda v: _number(v) and v > 0, "a positive number"),
}
LORA_CHECKS = {
    "r": (lambda v: _integer(v) and v >= 1, "a positive integer"),
    "alpha": (lambda v: _number(v) and v > 0, "a positive number"),
    "dropout": (lambda v: _number(v) and 0 <= v < 1, "a number in [0, 1)"),
    "targets": (lambda v: isinstance(v, tuple) and bool(v) and all(t in LORA_TARGETS for t in v),
                f"a non-empty list from {list(LORA_TARGETS)}"),
}
MOE_OVERRIDES = {
    "router_aux_loss_coef": _NONNEG, "router_z_loss_coef": _NONNEG, "aux_free_bias_rate": _NONNEG,
    "num_experts_per_tok": (lambda v: _integer(v) and v >= 1, "a positive integer"),
    "moe_top_p": (lambda v: v is None or (_number(v) and 0 < v <= 1), "a number in (0, 1] or null"),
    "use_inter_pool": (lambda v: isinstance(v, bool), "a boolean"),
    "aux_free_bias": (lambda v: isinstance(v, bool), "a boolean"),
    "router_balance": (lambda v: v in ("modality", "pool"), "'modality' or 'pool'"),
}


def _reject_unknown(raw: Mapping[str, Any], known, where: str, fail) -> None:
    if not isinstance(raw, Mapping):
        fail(f"{where} must be a mapping, got {type(raw).__name__}")
    unknown = sorted(set(raw) - set(known))
    if unknown:
        fail(f"unknown key{'s' if len(unknown) > 1 else ''} {', '.join(f'{where}.{k}' if where else k for k in unknown)}; "
             f"expected one of {sorted(known)}")


def check_section(raw: Mapping[str, Any], checks: dict, where: str, fail) -> dict[str, Any]:
    """Reject unknown keys, turn YAML lists into tuples, check every given value against its rule."""
    _reject_unknown(raw, checks, where, fail)
    values = {k: tuple(v) if isinstance(v, list) else v for k, v in raw.items()}
    for key, value in values.items():
        check, expected = checks[key]
        if not check(value):
            fail(f"{where}.{key} must be {expected}, got {raw[key]!r}")
    return values


@dataclass(frozen=True)
class OptimizerSpec:
    """AdamW settings, gradient clipping and the LR schedule of one stage (training/lr_schedule.py).

    Defaults: the setting that trained a small dense multimodal model (1.9 M parameters, image/audio/video/text
    tasks) to >= 0.99 held-out accuracy on every task on this codebase's CPU machine -- AdamW lr 5e-4, betas
    0.9/0.98, weight decay 0.01, cosine decay to 0.1x, clipping at 1.0; at lr 1e-3 its audio encoder collapsed, and
    a constant lr made late accuracy swing. `grad_clip`: clip the global gradient norm at this value; null turns
    clipping off."""

    lr: float = 5e-4
    betas: tuple[float, float] = (0.9, 0.98)
    eps: float = 1e-8
    weight_decay: float = 0.01
    warmup_steps: int = 0
    min_lr_ratio: float = 0.1
    schedule: str = "cosine"
    grad_clip: float | None = 1.0
    # routers' lr = lr x this (same schedule). Adam moves every weight by ~lr per step whatever its gradient's size,
    # so a router at the experts' lr barely leaves its initial near-uniform split within a short stage.
    router_lr_scale: float = 1.0

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any], fail) -> "OptimizerSpec":
        return cls(**check_section(raw, OPTIMIZER_CHECKS, "optimizer", fail))


@dataclass(frozen=True)
class LoraSpec:
    """LoRA settings of a stage (arguments of `omni_moe.training.lora.attach_lora`)."""

    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: tuple[str, ...] = DEFAULT_LORA_TARGETS

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any], fail) -> "LoraSpec":
        spec = cls(**check_section(raw, LORA_CHECKS, "lora", fail))
        if spec.dropout > 0 and "experts" in spec.targets:
            fail("lora.dropout must be 0 when lora.targets has 'experts' (PEFT's parameter LoRA has no dropout)")
        return spec


def preset_fields(name: str, **options: Any) -> dict[str, Any]:
    """`train` (and `lora`) of a standard stage.

    dense_pretrain: every weight of a dense LLM trained from scratch (stage 0, only where no pretrained LLM exists;
        `omni train` builds the dense model and exports it as a Qwen2 checkpoint for the next stage to upcycle).
    alignment: projectors only; `encoders_pretrained=False` adds the encoders (they start random).
    modality_experts: intra-modality experts + routers; `modalities` picks the pools (default: every modality's);
        `encoders_pretrained=False` adds the encoders and projectors.
    mixed_lora: LoRA on attention, routed and shared experts, + routers + projectors; `r`, `alpha` set the adapter;
        `encoders_pretrained=False` adds the encoders.
    """
    allowed = {"dense_pretrain": set(), "alignment": {"encoders_pretrained"},
               "modality_experts": {"modalities", "encoders_pretrained"},
               "mixed_lora": {"r", "alpha", "encoders_pretrained"}}
    if name not in allowed:
        raise StageConfigError(f"unknown preset {name!r}; expected one of {list(PRESETS)}")
    unknown = sorted(set(options) - allowed[name])
    if unknown:
        raise StageConfigError(f"preset {name!r}: unknown option(s) {unknown}; expected {sorted(allowed[name])}")
    encoders = [] if options.get("encoders_pretrained", True) else ["vision_encoder", "audio_encoder"]
    if name == "dense_pretrain":
        return {"train": ["all"]}
    if name == "alignment":
        return {"train": ["image_projector", "audio_projector", *encoders]}
    if name == "modality_experts":
        modalities = options.get("modalities")
        towers = [*encoders, "image_projector", "audio_projector"] if encoders else []
        if modalities is None:
            return {"train": ["intra_experts", "routers", *towers]}
        if isinstance(modalities, str) or not modalities:
            raise StageConfigError(f"preset 'modality_experts': modalities must be a non-empty list, got {modalities!r}")
        return {"train": [f"intra_experts:{m}" for m in modalities] + ["routers", *towers]}
    lora = {k: options[k] for k in ("r", "alpha") if k in options}
    return {"train": ["lora", "routers", "image_projector", "audio_projector", *encoders], "lora": lora}


@dataclass(frozen=True)
class StageSpec:
    """One training stage. Build it from a recipe's dict with `StageSpec.from_dict`."""

    name: str
    train: tuple[str, ...]
    steps: int  # optimizer steps: the only length a stage has
    data: tuple[dict[str, Any], ...] = ()
    optimizer: OptimizerSpec = field(default_factory=OptimizerSpec)
    moe: dict[str, Any] = field(default_factory=dict)
    lora: LoraSpec | None = None
    preset: str | None = None

    KEYS = ("name", "preset", "data", "train", "optimizer", "steps", "moe", "lora")

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any], index: int | None = None) -> "StageSpec":
        where = f"stage #{index}" if index is not None else "stage"
        if not isinstance(raw, Mapping):
            raise StageConfigError(f"{where}: expected a mapping, got {type(raw).__name__}")
        name = raw.get("name")
        if isinstance(name, str) and name:
            where = f"stage {name!r}"

        def fail(message: str):
            raise StageConfigError(f"{where}: {message}")

        _reject_unknown(raw, set(cls.KEYS), "", fail)
        if not (isinstance(name, str) and name.strip()):
            fail(f"name: a non-empty string is required, got {name!r}")
        values = dict(raw)
        preset = values.pop("preset", None)
        preset_name = None
        if preset is not None:
            preset_name, options = (preset, {}) if isinstance(preset, str) else (None, dict(preset))
            if preset_name is None:
                if not isinstance(preset, Mapping) or "name" not in options:
                    fail(f"preset: a preset name or a mapping with 'name' and options is required, got {preset!r}")
                preset_name = options.pop("name")
            try:
                defaults = preset_fields(preset_name, **options)
            except StageConfigError as exc:
                fail(f"preset: {exc}")
            values.setdefault("train", defaults["train"])
            if "lora" in defaults:
                values["lora"] = {**defaults["lora"], **(values.get("lora") or {})}

        train = values.get("train")
        if train is None:
            fail("train: the list of components to train is required (or a preset)")
        if isinstance(train, str) or not isinstance(train, (list, tuple)) or not train:
            fail(f"train: expected a non-empty list of components, got {train!r}")
        for item in train:
            head, _, modality = item.partition(":") if isinstance(item, str) else ("", "", "")
            if item not in COMPONENTS and not (head == "intra_experts" and modality):
                fail(f"train: unknown component {item!r}; expected one of {list(COMPONENTS)} or 'intra_experts:<modality>'")

        data = values.get("data", [])
        if not isinstance(data, (list, tuple)):
            fail(f"data: expected a list of {{source, weight}} entries, got {type(data).__name__}")
        for i, entry in enumerate(data):
            if not isinstance(entry, Mapping) or not isinstance(entry.get("source"), str) or not entry["source"]:
                fail(f"data[{i}]: each entry needs a 'source' string, got {entry!r}")
            unknown = sorted(set(entry) - {"source", "weight"})
            if unknown:
                fail(f"unknown key data[{i}].{unknown[0]}; a data entry has 'source' and 'weight'")
            weight = entry.get("weight", 1.0)
            if not (_number(weight) and weight > 0):
                fail(f"data[{i}].weight must be a positive number, got {weight!r}")

        steps = values.get("steps")
        if not (_integer(steps) and steps >= 1):
            fail(f"steps must be a positive integer (the stage's length in optimizer steps; required), got {steps!r}")

        moe = check_section(values.get("moe") or {}, MOE_OVERRIDES, "moe", fail)

        lora_raw = values.get("lora")
        lora = None if lora_raw is None else LoraSpec.from_dict(lora_raw, fail)
        optimizer = OptimizerSpec.from_dict(values.get("optimizer") or {}, fail)
        return cls(
            name=name, train=tuple(train), data=tuple(dict(e) for e in data), optimizer=optimizer, steps=steps,
            moe=moe, lora=lora, preset=preset_name,
        )


def parse_stages(raw: Any) -> list[StageSpec]:
    """A recipe's `stages:` list -> StageSpecs (names must be unique)."""
    if not isinstance(raw, (list, tuple)) or not raw:
        raise StageConfigError(f"stages: expected a non-empty list of stage mappings, got {raw!r}")
    stages = [StageSpec.from_dict(item, i) for i, item in enumerate(raw)]
    names = [s.name for s in stages]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise StageConfigError(f"stages: duplicate stage names {dupes}")
    return stages


__all__ = [
    "BASE_COMPONENTS", "COMPONENTS", "EXPERT_COMPONENTS", "LORA_CHECKS", "MOE_OVERRIDES", "OPTIMIZER_CHECKS",
    "PRESETS", "LoraSpec", "OptimizerSpec", "StageConfigError", "StageSpec", "check_section", "parse_stages",
    "preset_fields",
]
