"""Applying a stage to a model: `apply_stage` freezes exactly what the stage does not train and returns a
`FreezePlan`; `trainable_param_groups` turns the plan into optimizer groups.

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

from dataclasses import dataclass, field
from typing import Any, Mapping

import torch
from torch import nn

from .lora import attach_lora, canonical_param_name, has_lora, is_lora_param_name, unwrap_model
from .stage_spec import BASE_COMPONENTS, MOE_OVERRIDES, StageConfigError, StageSpec, check_section

_PREFIXES = {  # canonical parameter-name prefix -> component
    "media.vision_encoder.": "vision_encoder", "media.audio_encoder.": "audio_encoder",
    "media.image_projector.": "image_projector", "media.audio_projector.": "audio_projector",
    "model.embed_tokens.": "embeddings", "lm_head.": "embeddings", "model.norm.": "norms",
}
_LAYER_PARTS = {"self_attn": "attention", "input_layernorm": "norms", "post_attention_layernorm": "norms"}
_MOE_PARTS = {"gate": "routers", "shared_expert": "shared_experts", "shared_expert_gate": "shared_experts"}


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
                         "training/freeze.py (_base_component) before training this model")
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

    overrides = check_section(overrides, MOE_OVERRIDES, "moe", fail)
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
    "FreezePlan", "MaskedExperts", "apply_moe_overrides", "apply_stage", "local_global_ids", "prepare_model_for_stage",
    "trainable_param_groups",
]
