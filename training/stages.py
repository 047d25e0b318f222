"""Training stages as data: a `StageSpec` read from a recipe's YAML, and `apply_stage`, which freezes exactly what
the stage does not train.

A stage names the components it trains (`train:`), the data mixture, optimizer settings, its length, MoE routing
overrides and optional LoRA settings. Components resolve to parameter sets of `OmniMoeForCausalLM` (see
`COMPONENTS`); a preset (`alignment`, `modality_experts`, `mixed_lora`) fills `train` (and `lora`) for the standard
progression.

Routed experts are fused 3-D tensors holding every pool (`[intra(m0) .. intra(mN) | inter]`, global ids from
`config.expert_pools()`), so "train only the image intra experts" cannot be a `requires_grad` flag. Design chosen
(exact, and valid under DeepSpeed's fp32 master copies, which a "restore rows after step" hook would not reach):
  1. the fused tensor keeps `requires_grad=True` and a gradient hook (`index_fill`) writes 0 into the rows of frozen
     experts before the gradient is accumulated -- also over NaN/inf, so clipping and reductions see exact zeros;
  2. `trainable_param_groups` puts such tensors in their own group with `weight_decay=0` (AdamW's decoupled decay
     would otherwise shrink frozen rows even with a zero gradient).
With a fresh optimizer (every stage builds one), Adam-type moments of frozen rows stay exactly 0, so their update is
`0 / (sqrt(0) + eps) = 0` and the rows stay BITWISE unchanged. The price: the trainable rows of a partially frozen
tensor get no weight decay. Under expert parallelism the row masks use each rank's local -> global id map
(`experts.global_ids`, else `expert_offset + range(num_experts)`); call `apply_stage` AFTER sharding the experts
and attaching LoRA (both replace parameters, which would drop the hooks -- `trainable_param_groups` checks this).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Mapping

import torch
from torch import nn

from .lora import DEFAULT_LORA_TARGETS, LORA_TARGETS, attach_lora, canonical_param_name, has_lora, is_lora_param_name
from .lora import unwrap_model

BASE_COMPONENTS = (
    "vision_encoder", "audio_encoder", "image_projector", "audio_projector", "embeddings", "attention", "norms",
    "dense_mlp", "routers", "shared_experts",
)
EXPERT_COMPONENTS = ("inter_experts", "intra_experts")  # plus "intra_experts:<modality>"
COMPONENTS = BASE_COMPONENTS + EXPERT_COMPONENTS + ("lora", "all")
PRESETS = ("dense_pretrain", "alignment", "modality_experts", "mixed_lora")
_PREFIXES = {  # canonical parameter-name prefix -> component
    "media.vision_encoder.": "vision_encoder", "media.audio_encoder.": "audio_encoder",
    "media.image_projector.": "image_projector", "media.audio_projector.": "audio_projector",
    "model.embed_tokens.": "embeddings", "lm_head.": "embeddings", "model.norm.": "norms",
}
_LAYER_PARTS = {"self_attn": "attention", "input_layernorm": "norms", "post_attention_layernorm": "norms"}
_MOE_PARTS = {"gate": "routers", "shared_expert": "shared_experts", "shared_expert_gate": "shared_experts"}


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
    "schedule": (lambda v: v in ("cosine", "linear", "constant"), "'cosine', 'linear' or 'constant'"),
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


def _checked(raw: Mapping[str, Any], checks: dict, where: str, fail) -> dict[str, Any]:
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
    """AdamW settings and the LR schedule of one stage (defaults: GUIDE §6 calibration)."""

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
        return cls(**_checked(raw, OPTIMIZER_CHECKS, "optimizer", fail))


@dataclass(frozen=True)
class LoraSpec:
    """LoRA settings of a stage (arguments of `training.lora.attach_lora`)."""

    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: tuple[str, ...] = DEFAULT_LORA_TARGETS

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any], fail) -> "LoraSpec":
        spec = cls(**_checked(raw, LORA_CHECKS, "lora", fail))
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
    data: tuple[dict[str, Any], ...] = ()
    optimizer: OptimizerSpec = field(default_factory=OptimizerSpec)
    steps: int | None = None
    epochs: int | None = None
    moe: dict[str, Any] = field(default_factory=dict)
    lora: LoraSpec | None = None
    preset: str | None = None

    KEYS = ("name", "preset", "data", "train", "optimizer", "steps", "epochs", "moe", "lora")

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
            weight = entry.get("weight", 1.0)
            if not (_number(weight) and weight > 0):
                fail(f"data[{i}].weight must be a positive number, got {weight!r}")

        steps, epochs = values.get("steps"), values.get("epochs")
        if (steps is None) == (epochs is None):
            fail(f"give exactly one of steps or epochs (got steps={steps!r}, epochs={epochs!r})")
        for key, value in (("steps", steps), ("epochs", epochs)):
            if value is not None and not (_integer(value) and value >= 1):
                fail(f"{key} must be a positive integer, got {value!r}")

        moe = _checked(values.get("moe") or {}, MOE_OVERRIDES, "moe", fail)

        lora_raw = values.get("lora")
        lora = None if lora_raw is None else LoraSpec.from_dict(lora_raw, fail)
        optimizer = OptimizerSpec.from_dict(values.get("optimizer") or {}, fail)
        return cls(
            name=name, train=tuple(train), data=tuple(dict(e) for e in data), optimizer=optimizer, steps=steps,
            epochs=epochs, moe=moe, lora=lora, preset=preset_name,
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


# ----------------------------------------------------------------------------- resolving components
def _base_component(name: str, base: nn.Module) -> str:
    """Component of a (canonical) parameter name outside the routed expert tensors and LoRA."""
    for prefix, component in _PREFIXES.items():
        if name.startswith(prefix):
            return component
    parts = name.split(".")
    component = None
    if parts[:2] == ["model", "layers"] and len(parts) > 4:
        component = _LAYER_PARTS.get(parts[3])
        if parts[3] == "mlp":
            component = _MOE_PARTS.get(parts[4]) if base.model.layers[int(parts[2])].is_moe else "dense_mlp"
    if component is None:
        raise ValueError(f"apply_stage: parameter {name!r} belongs to no stage component; map it in "
                         "training/stages.py (_base_component) before training this model")
    return component


def _grouped_experts(block: nn.Module) -> nn.Module:
    experts = block.experts
    while hasattr(experts, "get_base_layer") and experts.get_base_layer() is not experts:
        experts = experts.get_base_layer()  # PEFT ParamWrapper(s) around the GroupedExperts
    return experts


def local_global_ids(experts: nn.Module) -> list[int]:
    """Global expert id of each local row of a GroupedExperts (expert parallelism: a rank's subset)."""
    ids = getattr(experts, "global_ids", None)
    if ids is None:
        offset = int(getattr(experts, "expert_offset", 0))
        ids = range(offset, offset + experts.num_experts)
    ids = [int(i) for i in ids]
    if len(ids) != experts.gate_up_proj.shape[0]:
        raise ValueError(f"experts hold {experts.gate_up_proj.shape[0]} rows but their global id map has {len(ids)}")
    return ids


def _resolve_train(stage: StageSpec, config, lora_present: bool) -> tuple[set[str], set[int], bool]:
    """(base components, global ids of trained routed experts, whether LoRA trains)."""
    pools = config.expert_pools()
    components, experts, train_lora = set(), set(), False

    def fail(message: str):
        raise StageConfigError(f"stage {stage.name!r}: train: {message}")

    for item in stage.train:
        if item == "all":
            components |= set(BASE_COMPONENTS)
            experts |= set(range(config.num_routed_experts))
            train_lora |= lora_present
        elif item == "lora":
            if not lora_present:
                fail("'lora' given but the model carries no LoRA adapter (use prepare_model_for_stage / attach_lora)")
            train_lora = True
        elif item == "inter_experts":
            experts |= set(pools["inter"])
        elif item == "intra_experts":
            experts |= {g for m in config.modalities for g in pools[m]}
        elif item.startswith("intra_experts:"):
            modality = item.partition(":")[2]
            if modality not in config.modalities:
                fail(f"{item!r}: unknown modality {modality!r}; this model has {config.modalities}")
            experts |= set(pools[modality])
        else:
            components.add(item)
    return components, experts, train_lora


# ----------------------------------------------------------------------------- the freeze plan
@dataclass
class MaskedExperts:
    """A fused expert tensor of which only some rows train (a gradient hook zeroes the others)."""

    name: str
    param: nn.Parameter
    global_ids: tuple[int, ...]  # local row -> global expert id
    trainable_rows: tuple[int, ...]  # local rows that train


@dataclass
class FreezePlan:
    """What `apply_stage` did: element counts per component (routed experts per pool: `intra_experts:<m>`,
    `inter_experts`), the global ids of the routed experts that train, the row-masked tensors and the MoE
    overrides applied ({key: (old, new)})."""

    stage: str
    trainable: dict[str, int]
    frozen: dict[str, int]
    trainable_experts: tuple[int, ...]
    masked: list[MaskedExperts]
    moe_changes: dict[str, tuple[Any, Any]]
    component_of: dict[int, str] = field(repr=False, default_factory=dict)  # id(param) -> component
    handles: list = field(repr=False, default_factory=list)

    @property
    def num_trainable(self) -> int:
        return sum(self.trainable.values())

    @property
    def num_frozen(self) -> int:
        return sum(self.frozen.values())

    def remove(self) -> None:
        """Remove the gradient hooks (requires_grad flags and MoE overrides stay as they are)."""
        for handle in self.handles:
            handle.remove()
        self.handles.clear()

    def summary(self) -> str:
        lines = [f"stage {self.stage!r}: {self.num_trainable:,} trainable / {self.num_frozen:,} frozen parameters"]
        for component in sorted(set(self.trainable) | set(self.frozen)):
            lines.append(f"  {component:<24} trainable {self.trainable.get(component, 0):>12,}"
                         f"  frozen {self.frozen.get(component, 0):>12,}")
        lines.append(f"  routed experts training (global ids): {list(self.trainable_experts)}")
        for key, (old, new) in self.moe_changes.items():
            lines.append(f"  moe.{key}: {old!r} -> {new!r}")
        return "\n".join(lines)


@torch.no_grad()
def apply_moe_overrides(model: nn.Module, overrides: Mapping[str, Any]) -> dict[str, tuple[Any, Any]]:
    """Set MoE routing settings on the live model: its config and what each MoE block caches (`top_k`, `top_p`,
    aux-free bias flags, the router's `allowed` mask). Invalid combinations (e.g. top-k above a pool's size without
    the inter pool) raise and leave the model unchanged. Returns {key: (old, new)} for the values that changed."""
    def fail(message: str):
        raise StageConfigError(f"moe overrides: {message}")

    overrides = _checked(overrides, MOE_OVERRIDES, "moe", fail)
    base = unwrap_model(model)
    config = base.config
    old = {key: getattr(config, key) for key in overrides}
    for key, value in overrides.items():
        setattr(config, key, value)
    try:
        config.validate_omni()
    except ValueError as exc:
        for key, value in old.items():
            setattr(config, key, value)
        raise StageConfigError(f"moe overrides {dict(overrides)} are invalid for this model: {exc}") from None
    rows = config.allowed_experts()
    for block in base.moe_blocks:
        block.top_k = config.num_experts_per_tok
        block.top_p = config.moe_top_p
        block.aux_free_bias = config.aux_free_bias
        block.aux_free_bias_rate = config.aux_free_bias_rate
        block.router_balance = config.router_balance
        # allowed_rows too: _init_weights restores the buffer from it after meta-device construction
        block.gate.allowed_rows = tuple(tuple(row) for row in rows)
        block.gate.allowed.copy_(torch.tensor(rows, dtype=torch.bool, device=block.gate.allowed.device))
    return {key: (old[key], value) for key, value in overrides.items() if old[key] != value}


def _zero_rows_hook(frozen_rows: torch.Tensor):
    def hook(grad: torch.Tensor) -> torch.Tensor:
        # index_fill, not a multiply: NaN/inf in a frozen row must become 0 too
        return grad.index_fill(0, frozen_rows.to(grad.device), 0.0)

    return hook


def apply_stage(model: nn.Module, stage: StageSpec) -> FreezePlan:
    """Apply `stage` to `model` (plain or PEFT-wrapped): MoE overrides, `requires_grad` per component, row-mask
    gradient hooks on partially trained fused expert tensors. Replaces the hooks of an earlier `apply_stage`."""
    base = unwrap_model(model)
    previous = getattr(base, "_omni_freeze_plan", None)
    if previous is not None:
        previous.remove()
    components, trained_experts, train_lora = _resolve_train(stage, base.config, has_lora(model))
    moe_changes = apply_moe_overrides(base, stage.moe) if stage.moe else {}

    pool_of = {g: (f"intra_experts:{m}" if m in base.config.modalities else "inter_experts")
               for m, ids in base.config.expert_pools().items() if m != "null" for g in ids}
    expert_tensors = {}
    for block in base.moe_blocks:
        experts = _grouped_experts(block)
        ids = local_global_ids(experts)
        for attr in ("gate_up_proj", "down_proj"):
            expert_tensors[id(getattr(experts, attr))] = ids

    trainable, frozen, component_of, masked, handles = {}, {}, {}, [], []
    for name, param in base.named_parameters():
        canonical = canonical_param_name(name)
        if id(param) in expert_tensors:
            ids = expert_tensors[id(param)]
            rows = [i for i, g in enumerate(ids) if g in trained_experts]
            per_row = param[0].numel()
            for g in ids:
                bucket = trainable if g in trained_experts else frozen
                bucket[pool_of[g]] = bucket.get(pool_of[g], 0) + per_row
            component_of[id(param)] = "routed_experts"
            param.requires_grad_(bool(rows))
            if rows and len(rows) < len(ids):
                frozen_rows = torch.tensor([i for i in range(len(ids)) if i not in rows], device=param.device)
                handles.append(param.register_hook(_zero_rows_hook(frozen_rows)))
                masked.append(MaskedExperts(canonical, param, tuple(ids), tuple(rows)))
            continue
        component = "lora" if is_lora_param_name(name) else _base_component(canonical, base)
        trains = train_lora if component == "lora" else component in components
        param.requires_grad_(trains)
        component_of[id(param)] = component
        bucket = trainable if trains else frozen
        bucket[component] = bucket.get(component, 0) + param.numel()

    if not trainable:
        raise StageConfigError(f"stage {stage.name!r}: train {list(stage.train)} selects no parameter of this model "
                               f"(its components: {sorted(frozen)})")
    plan = FreezePlan(
        stage=stage.name, trainable=trainable, frozen=frozen, trainable_experts=tuple(sorted(trained_experts)),
        masked=masked, moe_changes=moe_changes, component_of=component_of, handles=handles,
    )
    base._omni_freeze_plan = plan
    return plan


def trainable_param_groups(
    model: nn.Module, plan: FreezePlan, lr: float, weight_decay: float, router_lr_scale: float = 1.0
) -> list[dict[str, Any]]:
    """Optimizer groups of the trainable parameters only (frozen ones get no optimizer state): "decay" (weights),
    "no_decay" (norms, biases, routers), "expert_rows_masked" (partially trained fused expert tensors, weight
    decay 0 so frozen rows stay bitwise unchanged) and, with `router_lr_scale != 1`, "routers" (lr x scale). Each
    group has a "name" (DeepSpeed's MoE group split needs it). Empty groups are left out."""
    live = {id(p): n for n, p in model.named_parameters()}
    stale = [m.name for m in plan.masked if id(m.param) not in live]
    if stale:
        raise RuntimeError(f"trainable_param_groups: the row-masked expert tensors {stale[:3]} are no longer in the "
                           "model (experts re-sharded or wrapped after apply_stage?); call apply_stage again")
    masked_ids = {id(m.param) for m in plan.masked}
    decay, no_decay, masked, routers = [], [], [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        component = plan.component_of.get(id(param))
        if component is None:
            raise RuntimeError(f"trainable_param_groups: {name} appeared after apply_stage ran; call apply_stage again")
        if id(param) in masked_ids:
            masked.append(param)
        elif component == "routers" and router_lr_scale != 1.0:
            routers.append(param)
        elif param.ndim < 2 or component in ("norms", "routers"):
            no_decay.append(param)
        else:
            decay.append(param)
    groups = [
        {"name": "decay", "params": decay, "lr": lr, "weight_decay": weight_decay},
        {"name": "no_decay", "params": no_decay, "lr": lr, "weight_decay": 0.0},
        {"name": "expert_rows_masked", "params": masked, "lr": lr, "weight_decay": 0.0},
        {"name": "routers", "params": routers, "lr": lr * router_lr_scale, "weight_decay": 0.0},
    ]
    return [g for g in groups if g["params"]]


def prepare_model_for_stage(model: nn.Module, stage: StageSpec) -> nn.Module:
    """Attach the stage's LoRA adapter when it asks for one and the model has none; returns the (possibly
    PEFT-wrapped) model to pass to `apply_stage`."""
    if stage.lora is not None and not has_lora(model):
        s = stage.lora
        return attach_lora(model, r=s.r, alpha=s.alpha, dropout=s.dropout, targets=s.targets)
    return model


__all__ = [
    "BASE_COMPONENTS", "COMPONENTS", "FreezePlan", "LoraSpec", "MaskedExperts", "OptimizerSpec", "PRESETS",
    "StageConfigError", "StageSpec", "apply_moe_overrides", "apply_stage", "local_global_ids", "parse_stages",
    "prepare_model_for_stage", "preset_fields", "trainable_param_groups",
]
