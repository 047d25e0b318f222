"""LoRA adapters through PEFT for `OmniMoeForCausalLM`: attention, routed (fused 3-D) experts, shared experts.

What `attach_lora` returns: a `peft.PeftModel` (no task type). It keeps the model usable as before:
`model(**batch)` goes straight to `OmniMoeForCausalLM.forward` (PeftModel passes every keyword through), and
attributes PEFT does not own (`.config`, `.moe_blocks`, `.generate`, ...) are forwarded to the wrapped model by
PeftModel's `__getattr__`. `unwrap_model` returns the `OmniMoeForCausalLM` itself. Parameter names gain the prefix
`base_model.model.` and wrapped layers a `.base_layer` segment (`...q_proj.base_layer.weight`,
`...experts.base_layer.base_layer.gate_up_proj`); the adapter weights are `...lora_A.default.weight` etc.

How each target is reached (peft 0.22; checked by tests/unit/test_lora.py):
  * attention q/k/v/o and the shared expert's gate/up/down: `target_modules`, a regex anchored at the decoder
    (`model.layers.N....`) so the CLIP/Whisper encoders' own `self_attn.q_proj` are never touched;
  * routed experts: `target_parameters=["experts.gate_up_proj", "experts.down_proj"]` -- `target_modules` cannot
    reach fused 3-D tensors. PEFT wraps the `GroupedExperts` module in two nested `ParamWrapper`s and, during each
    forward, parametrizes the tensor as `W + scaling * B_e @ A_e`.

Per-expert, not shared: for a `[E, out, in]` tensor PEFT's `ParamWrapper` builds `lora_A = Linear(in, r * E)` and
`lora_B = Linear(r * E, out)` and reshapes them into E independent rank-r factors (peft/tuners/lora/layer.py,
`ParamWrapper.get_delta_weight` / `get_delta_factors`): expert e gets `A_e = lora_A.weight[e*r:(e+1)*r]` (rows,
expert-major) and `B_e = lora_B.weight[:, e::E]` (columns, rank-major, i.e. column `j*E + e` is rank j of expert
e). So every expert has its own low-rank delta (E * r * (in + out) parameters per tensor). Under expert
parallelism the experts must be sharded before `attach_lora`, so E is the rank's local count; the adapter's expert
rows/columns then follow the rank's local expert order (`experts.global_ids`).

Limits inherited from PEFT: parameter LoRA supports no dropout, DoRA or LoRA bias, so `attach_lora` refuses
`dropout > 0` when the routed experts are targeted (instead of silently dropping it for some layers).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.lora import ParamWrapper
from safetensors.torch import save_file
from torch import nn

from omni_moe.modeling.modeling_omni import OmniMoeForCausalLM
from omni_moe.modeling.moe import GroupedExperts

from .checkpoint_files import load_tensors

LORA_TARGETS = ("attention", "experts", "shared_experts", "dense_mlp")
DEFAULT_LORA_TARGETS = ("attention", "experts", "shared_experts")
ROUTED_EXPERT_PARAMETERS = ("experts.gate_up_proj", "experts.down_proj")
# module-name patterns relative to OmniMoeForCausalLM (PEFT full-matches a string target_modules against each name)
_MODULE_PATTERNS = {
    "attention": r"self_attn\.(q_proj|k_proj|v_proj|o_proj)",
    "shared_experts": r"mlp\.shared_expert\.(gate_proj|up_proj|down_proj)",
    "dense_mlp": r"mlp\.(gate_proj|up_proj|down_proj)",  # only dense layers have these directly under `mlp`
}
# Trained base (non-LoRA) parameters saved next to the PEFT adapter: PEFT's adapter holds only LoRA weights, but a
# stage such as `mixed_lora` also trains routers and projectors; without them the adapter would not reproduce the run.
TRAINED_BASE_FILE = "trained_base_params.safetensors"
TRAINED_BASE_INDEX = "trained_base_params.json"
_LORA_NAME_PARTS = ("lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B", "lora_magnitude_vector")


def unwrap_model(model: nn.Module) -> OmniMoeForCausalLM:
    """The `OmniMoeForCausalLM` inside a PeftModel (or a DeepSpeed engine's `.module`), or the model itself."""
    seen = 0
    while not isinstance(model, OmniMoeForCausalLM):
        if isinstance(model, PeftModel):
            model = model.get_base_model()
        elif isinstance(getattr(model, "module", None), nn.Module):
            model = model.module
        else:
            raise TypeError(f"expected an OmniMoeForCausalLM (optionally wrapped by PEFT), got {type(model).__name__}")
        seen += 1
        if seen > 8:
            raise TypeError("could not unwrap the model: wrappers nest more than 8 deep")
    return model


def is_lora_param_name(name: str) -> bool:
    """Whether a parameter name belongs to a LoRA adapter (PEFT's `lora_A` / `lora_B` / ... sub-modules)."""
    return any(part in _LORA_NAME_PARTS for part in name.split("."))


def canonical_param_name(name: str) -> str:
    """A parameter's name in the plain model: without PEFT's `base_model.model.` prefix and `.base_layer` segments."""
    if name.startswith("base_model.model."):
        name = name[len("base_model.model.") :]
    return ".".join(part for part in name.split(".") if part != "base_layer")


def has_lora(model: nn.Module) -> bool:
    return any(is_lora_param_name(name) for name, _ in model.named_parameters())


def lora_target_modules_regex(targets: Iterable[str]) -> str | None:
    parts = [_MODULE_PATTERNS[t] for t in targets if t in _MODULE_PATTERNS]
    if not parts:
        return None
    return r"model\.layers\.\d+\.(" + "|".join(parts) + ")"


def _check_targets(targets: Iterable[str]) -> tuple[str, ...]:
    targets = tuple(targets)
    unknown = [t for t in targets if t not in LORA_TARGETS]
    if unknown or not targets:
        raise ValueError(f"LoRA targets {list(targets)}: unknown {unknown}; choose a non-empty subset of {LORA_TARGETS}")
    return targets


def build_lora_config(r: int, alpha: float, dropout: float, targets: Iterable[str]) -> LoraConfig:
    targets = _check_targets(targets)
    if not (isinstance(r, int) and r >= 1):
        raise ValueError(f"LoRA rank r must be a positive integer, got {r!r}")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"LoRA dropout must be in [0, 1), got {dropout}")
    if dropout > 0 and "experts" in targets:
        raise ValueError(
            f"LoRA dropout={dropout} with target 'experts': PEFT's parameter LoRA (fused routed experts) cannot apply "
            "dropout; use dropout=0 or drop 'experts' from the targets"
        )
    return LoraConfig(
        r=r,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules=lora_target_modules_regex(targets),
        target_parameters=list(ROUTED_EXPERT_PARAMETERS) if "experts" in targets else None,
        bias="none",
    )


def attach_lora(
    model: nn.Module,
    r: int,
    alpha: float,
    dropout: float = 0.0,
    targets: Iterable[str] = DEFAULT_LORA_TARGETS,
) -> PeftModel:
    """Wrap `model` (an `OmniMoeForCausalLM`) with a fresh LoRA adapter named "default" and return the PeftModel.

    `targets` is a subset of `LORA_TARGETS`: "attention" (decoder q/k/v/o), "experts" (routed fused experts,
    per-expert adapters), "shared_experts" (the shared expert's gate/up/down), "dense_mlp" (FFN of non-MoE layers).
    PEFT marks only the LoRA parameters trainable; `omni_moe.training.freeze.apply_stage` sets the stage's full trainable set.
    LoRA starts as a no-op (B = 0). Shard experts for expert parallelism before calling this.
    """
    if isinstance(model, PeftModel):
        raise ValueError("attach_lora: the model already carries a PEFT adapter; merge_lora or unwrap it first")
    base = unwrap_model(model)
    config = build_lora_config(r, alpha, dropout, targets)
    if "experts" in tuple(targets) and not base.moe_blocks:
        raise ValueError("attach_lora: target 'experts' given but the model has no MoE layers")
    return get_peft_model(base, config)


def expert_lora_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """LoRA parameters that live inside routed experts (PEFT `ParamWrapper`s around a `GroupedExperts`), named as
    in `model.named_parameters()`. The engine tags these as expert-parallel parameters: each EP rank's copies adapt
    different experts and must not be averaged over the full data-parallel group."""
    found: dict[int, tuple[str, nn.Parameter]] = {}
    for module_name, module in model.named_modules():
        if isinstance(module, ParamWrapper) and isinstance(module.get_base_layer(), GroupedExperts):
            for attr in ("lora_A", "lora_B"):
                prefix = f"{module_name}.{attr}" if module_name else attr
                for name, param in getattr(module, attr).named_parameters(prefix=prefix):
                    found.setdefault(id(param), (name, param))
    return sorted(found.values(), key=lambda item: item[0])


def merge_lora(model: nn.Module) -> OmniMoeForCausalLM:
    """Fold every LoRA delta into its base weight and return the plain `OmniMoeForCausalLM` (in place: the wrapped
    model's weights change). A model without an adapter is returned unchanged."""
    if isinstance(model, PeftModel):
        merged = model.merge_and_unload()
        return unwrap_model(merged)
    return unwrap_model(model)


def trained_base_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Trainable non-LoRA parameters (e.g. routers, projectors of a LoRA stage), by canonical (plain-model) name."""
    state: dict[str, torch.Tensor] = {}
    for name, param in model.named_parameters():
        if param.requires_grad and not is_lora_param_name(name):
            state[canonical_param_name(name)] = param.detach().cpu().contiguous()
    return state


def save_adapter(model: nn.Module, directory: str | Path) -> Path:
    """Save the LoRA adapter in PEFT's format (`adapter_config.json`, `adapter_model.safetensors`; loadable by
    `PeftModel.from_pretrained`) plus, when the stage also trains base parameters, `trained_base_params.safetensors`
    with those (PEFT alone would drop them). Returns the directory."""
    if not isinstance(model, PeftModel):
        raise TypeError(f"save_adapter: expected a PeftModel from attach_lora, got {type(model).__name__}")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(directory), safe_serialization=True)
    extra = trained_base_state(model)
    if extra:
        save_file(extra, str(directory / TRAINED_BASE_FILE), metadata={"format": "pt"})
        (directory / TRAINED_BASE_INDEX).write_text(json.dumps({"parameters": sorted(extra)}, indent=2) + "\n")
    return directory


@torch.no_grad()
def load_adapter(base_model: nn.Module, directory: str | Path, trainable: bool = False) -> PeftModel:
    """Load an adapter saved by `save_adapter` onto `base_model` (the same base weights it was trained on): first
    the trained base parameters (if saved), then the LoRA weights through `PeftModel.from_pretrained`."""
    directory = Path(directory)
    if not (directory / "adapter_config.json").is_file():
        raise FileNotFoundError(f"load_adapter: {directory} holds no adapter_config.json (not a saved adapter)")
    base = unwrap_model(base_model)
    if isinstance(base_model, PeftModel):
        raise ValueError("load_adapter: base_model already carries an adapter; pass the plain model")
    extra_file = directory / TRAINED_BASE_FILE
    if extra_file.is_file():
        extra = load_tensors(extra_file)  # a decode failure names the file
        params = dict(base.named_parameters())
        missing = sorted(set(extra) - set(params))
        if missing:
            raise KeyError(f"load_adapter: {extra_file} names parameters the base model lacks: {missing[:5]}")
        for name, value in extra.items():
            if params[name].shape != value.shape:
                raise ValueError(
                    f"load_adapter: {extra_file}: {name} has shape {tuple(value.shape)}, the base model "
                    f"{tuple(params[name].shape)}"
                )
            params[name].copy_(value)
    return PeftModel.from_pretrained(base, str(directory), is_trainable=trainable)


__all__ = [
    "DEFAULT_LORA_TARGETS",
    "LORA_TARGETS",
    "attach_lora",
    "build_lora_config",
    "canonical_param_name",
    "expert_lora_parameters",
    "has_lora",
    "is_lora_param_name",
    "load_adapter",
    "merge_lora",
    "save_adapter",
    "trained_base_state",
    "unwrap_model",
]
