"""Upcycling: a dense HF Qwen2 / Llama checkpoint (+ vision / audio encoder checkpoints) -> `OmniMoeForCausalLM`.

Attention, norms, embeddings and the LM head are copied. In MoE layers every routed expert is initialised from the
dense FFN: `"copy"` (the whole FFN; optional noise) or `"slice"` (expert e takes slice e mod s of the FFN's intermediate
dimension, s = intermediate_size // moe_intermediate_size). Shared expert i takes slice i of the dense FFN's gate/up
weights (rows [i * size, (i + 1) * size), size = shared_expert_intermediate_size) with a zero down projection, so
the shared experts start as a no-op and learn from there.

Why that shared-expert init: with copied experts and renormalised top-k weights the routed output already equals the
dense FFN, so the layer reproduces the dense model exactly at init only if the shared path adds nothing — and a
sigmoid gate cannot output 0 (a zero gate weight gives 0.5). A zero down projection does, and still receives gradients.
Exactness also needs `num_null_experts == 0` (a token routed to a null expert gets a scaled-down output).
"""

from __future__ import annotations

import json
import os
from typing import Any

import torch
from safetensors import safe_open
from transformers import AutoConfig

from .configuration_omni import OmniMoeConfig
from .encoders import AudioEncoder, VisionEncoder
from .modeling_omni import OmniMoeForCausalLM

LLM_FIELDS = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "hidden_act",
    "max_position_embeddings",
    "rms_norm_eps",
    "tie_word_embeddings",
    "bos_token_id",
    "eos_token_id",
    "pad_token_id",
)


# The `model_type`s of the dense checkpoints upcycling reads.
DENSE_MODEL_TYPES = ("qwen2", "llama")


def dense_llm_fields(dense_config) -> dict[str, Any]:
    """The LLM part of an OmniMoeConfig, read off a Qwen2 / Llama config."""
    if dense_config.model_type not in DENSE_MODEL_TYPES:
        raise ValueError(f"upcycling supports {' and '.join(DENSE_MODEL_TYPES)} checkpoints, got "
                         f"model_type={dense_config.model_type!r}")
    fields = {k: getattr(dense_config, k) for k in LLM_FIELDS if getattr(dense_config, k, None) is not None}
    rope = getattr(dense_config, "rope_parameters", None) or {}
    if rope.get("rope_type", "default") != "default":
        raise ValueError(f"rope_type {rope.get('rope_type')!r} is not supported by Omni 3D RoPE (only default RoPE)")
    fields["rope_theta"] = rope.get("rope_theta", getattr(dense_config, "rope_theta", 10000.0))
    fields["head_dim"] = getattr(dense_config, "head_dim", None) or dense_config.hidden_size // dense_config.num_attention_heads
    # Qwen2 always has q/k/v biases; Llama has them only when attention_bias is set (and then on o_proj too, unsupported).
    if dense_config.model_type == "qwen2":
        fields["attention_bias"] = True
    else:
        if getattr(dense_config, "attention_bias", False):
            raise ValueError("Llama checkpoints with attention_bias=True (o_proj bias) are not supported")
        fields["attention_bias"] = False
    return fields


def encoder_config(path: str, kind: str):
    """The vision (CLIP/SigLIP, full or vision-only) or audio (Whisper) config of a local checkpoint."""
    config = AutoConfig.from_pretrained(path)
    if kind == "vision":
        config = getattr(config, "vision_config", None) or config
        if config.model_type not in ("clip_vision_model", "siglip_vision_model"):
            raise ValueError(f"{path}: not a CLIP or SigLIP checkpoint (model_type={config.model_type!r})")
    elif config.model_type != "whisper":
        raise ValueError(f"{path}: not a Whisper checkpoint (model_type={config.model_type!r})")
    return config


class SafetensorsFolder:
    """A (possibly sharded) safetensors checkpoint folder, read one tensor at a time: upcycling never holds the whole
    dense checkpoint in memory (a 7B LLM is 15 GB in bf16, per rank)."""

    def __init__(self, path: str):
        index = os.path.join(path, "model.safetensors.index.json")
        if os.path.exists(index):
            with open(index) as f:
                files = sorted(set(json.load(f)["weight_map"].values()))
        elif os.path.exists(os.path.join(path, "model.safetensors")):
            files = ["model.safetensors"]
        else:
            raise FileNotFoundError(f"{path}: no model.safetensors or model.safetensors.index.json (only safetensors "
                                    "checkpoints are read)")
        self._handles = [safe_open(os.path.join(path, name), framework="pt") for name in files]
        self._file_of = {key: h for h in self._handles for key in h.keys()}

    def keys(self) -> list[str]:
        return list(self._file_of)

    def __getitem__(self, key: str) -> torch.Tensor:
        return self._file_of[key].get_tensor(key)


def upcycle(
    dense_path: str,
    vision_path: str | None = None,
    audio_path: str | None = None,
    expert_init: str = "copy",
    noise_std: float = 0.0,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    **moe_config: Any,
) -> OmniMoeForCausalLM:
    """Build the MoE model from local checkpoint directories. `moe_config` holds every non-LLM OmniMoeConfig field."""
    if expert_init not in ("copy", "slice"):
        raise ValueError(f"expert_init must be 'copy' or 'slice', got {expert_init!r}")
    dense_config = AutoConfig.from_pretrained(dense_path)
    fields = dense_llm_fields(dense_config)
    clash = sorted(set(fields) & set(moe_config) - {"pad_token_id", "bos_token_id", "eos_token_id", "vocab_size"})
    if clash:
        raise ValueError(f"{clash} come from the dense checkpoint {dense_path}; do not pass them")
    if vision_path is not None:
        moe_config["vision_config"] = encoder_config(vision_path, "vision")
    if audio_path is not None:
        moe_config["audio_config"] = encoder_config(audio_path, "audio")
    config = OmniMoeConfig(**{**fields, **moe_config})
    if expert_init == "slice" and config.intermediate_size % config.moe_intermediate_size:
        raise ValueError(
            f"slice init needs intermediate_size ({config.intermediate_size}) divisible by "
            f"moe_intermediate_size ({config.moe_intermediate_size})"
        )
    if expert_init == "copy" and config.moe_intermediate_size != config.intermediate_size:
        raise ValueError("copy init needs moe_intermediate_size == intermediate_size (use expert_init='slice')")

    # Built directly in the training dtype and filled in place, a tensor at a time: the peak is the model plus one
    # layer's dense FFN, not an fp32 model plus a second (upcycled) copy of its experts (measured:
    # docs/performance.md, "Upcycling memory").
    model = OmniMoeForCausalLM._from_config(config, dtype=dtype)
    filled = load_upcycled_weights(model, SafetensorsFolder(dense_path), expert_init, noise_std,
                                   torch.Generator().manual_seed(seed))
    # new by design: media tower, routers and shared-expert gates keep their fresh init
    new_params = ("media.", ".mlp.gate.", ".mlp.shared_expert_gate.")
    llm_missing = [k for k in model.state_dict() if k not in filled and k != "lm_head.weight"
                   and not any(p in k or k.startswith(p) for p in new_params)]
    if llm_missing:
        raise ValueError(f"upcycling {dense_path}: the checkpoint has no {llm_missing[:8]}")
    if config.tie_word_embeddings:
        model.tie_weights()
    if vision_path is not None:
        model.media.vision_encoder.load_state_dict(VisionEncoder.from_pretrained(vision_path).state_dict())
    if audio_path is not None:
        model.media.audio_encoder.load_state_dict(AudioEncoder.from_pretrained(audio_path).state_dict())
    return model.to(dtype)


@torch.no_grad()
def load_upcycled_weights(model, dense: SafetensorsFolder, expert_init: str, noise_std: float, generator) -> set[str]:
    """Copy the dense checkpoint into the MoE model in place; returns the state-dict names it filled.

    Non-FFN tensors are copied as they are; each MoE layer's routed experts take the dense FFN (copy) or slices of
    its intermediate dimension (slice), with optional noise scaled by each tensor's std; the shared experts take the
    first num_shared_experts x shared_expert_intermediate_size rows of gate/up and a zero down projection."""
    config = model.config
    own = model.state_dict(keep_vars=True)  # the parameters and buffers themselves: copy_ writes into the model
    filled: set[str] = set()

    def put(key: str, value: torch.Tensor) -> None:
        if key not in own:
            raise ValueError(f"dense checkpoint tensor {key!r} has no place in the MoE model")
        if own[key].shape != value.shape:
            raise ValueError(f"dense checkpoint tensor {key!r} has shape {tuple(value.shape)}, the MoE model "
                             f"expects {tuple(own[key].shape)}")
        own[key].copy_(value)
        filled.add(key)

    for key in dense.keys():
        if ".mlp." in key and _layer_index(key) is not None and config.is_moe_layer(_layer_index(key)):
            continue  # MoE layers are filled below
        if key == "lm_head.weight" and config.tie_word_embeddings:
            continue
        put(key, dense[key])
    for i, layer in enumerate(model.model.layers):
        if not layer.is_moe:
            continue
        prefix = f"model.layers.{i}.mlp."
        gate, up, down = (dense[prefix + f"{p}_proj.weight"] for p in ("gate", "up", "down"))
        experts = layer.mlp.experts
        ffn = config.moe_intermediate_size
        n_slices = config.intermediate_size // ffn
        for e in range(experts.num_experts):
            j = e % n_slices if expert_init == "slice" else 0
            rows = slice(j * ffn, (j + 1) * ffn)
            gu = torch.cat([gate[rows], up[rows]], dim=0)
            dn = down[:, rows].clone()
            if noise_std > 0:
                gu += noise_std * gu.std() * torch.randn(gu.shape, generator=generator).to(gu.dtype)
                dn += noise_std * dn.std() * torch.randn(dn.shape, generator=generator).to(dn.dtype)
            experts.gate_up_proj[e].copy_(gu)
            experts.down_proj[e].copy_(dn)
        filled |= {prefix + "experts.gate_up_proj", prefix + "experts.down_proj"}
        if config.num_shared_experts:
            # the n shared experts are one MLP (configuration_omni.py): their slices 0..n-1 are its first n * size rows
            size = config.shared_mlp_intermediate_size
            if size > gate.shape[0]:
                raise ValueError(
                    f"num_shared_experts x shared_expert_intermediate_size = {config.num_shared_experts} x "
                    f"{config.shared_expert_intermediate_size} = {size} > the dense intermediate_size {gate.shape[0]}: "
                    "the shared experts are initialised from distinct slices of the dense FFN")
            put(prefix + "shared_expert.gate_proj.weight", gate[:size])
            put(prefix + "shared_expert.up_proj.weight", up[:size])
            put(prefix + "shared_expert.down_proj.weight", torch.zeros_like(down[:, :size]))
    return filled


def _layer_index(key: str) -> int | None:
    parts = key.split(".")
    if len(parts) > 2 and parts[0] == "model" and parts[1] == "layers":
        return int(parts[2])
    return None
