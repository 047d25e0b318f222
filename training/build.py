"""The build step of a run: tokenizer, the model plan and its weights, processor, and this rank's loader.

    plan = plan_model(recipe, stage, tokenizer)     # config.json files only: what the stage trains
    model = build_model(plan, dtype)                # the plan with weights (meta_model(plan): shapes only)

`plan_model` is the single place that decides a stage's model -- the dense LLM of a `dense_pretrain` stage, a model
built from `model.config`, upcycled from a dense checkpoint (`model.upcycle`, or the dense_pretrain stage's export),
loaded `from` a folder, or the previous stage's export -- and its `OmniMoeConfig`. The run and the dry run
(training/dry_run.py) both go through it, so the plan a user reads is the model the run builds
(tests/unit/test_build_plan.py holds them equal).
"""

from __future__ import annotations

import contextlib
import json
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .distributed import barrier, get_rank, get_world_size
from .recipe import UPCYCLE_OPTIONS, Recipe, RecipeError

DENSE_LLM_FIXED = {"moe_layers": "none", "modalities": ["text"], "num_intra_experts": 0, "num_inter_experts": 0,
                   "num_shared_experts": 0, "num_null_experts": 0, "vision_config": None, "audio_config": None}


# ----------------------------------------------------------------------------- tokenizer
def manifest_texts(manifest: str | Path) -> list[str]:
    """Every message of a canonical JSONL manifest as the chat template lays it out between its special tokens,
    "ROLE\nTEXT" (what a BPE tokenizer for the dataset is trained on). Without the role line the BPE never sees
    "assistant" and spends 9 tokens on it in every sample (measured: 36 -> 22 tokens per synthetic sample)."""
    texts = []
    with open(manifest, encoding="utf-8") as handle:
        for line in handle:
            if line.strip():
                for message in json.loads(line).get("messages", []):
                    content = message.get("content")
                    parts = content if isinstance(content, list) else [content]
                    text = "".join(p if isinstance(p, str) else p.get("text", "") for p in parts if p)
                    texts.append(f"{message.get('role', 'user')}\n{text}")
    return texts


def load_tokenizer(recipe: Recipe, source: str | Path | None):
    """Collective. The tokenizer: from `source` (a model folder), a tokenizer folder, or a BPE trained by rank 0 on
    a manifest and saved to OUTPUT/tokenizer (then read by every rank, so all ranks hold the identical one)."""
    # the fast-tokenizer class directly: AutoTokenizer would read an exported folder's config.json (auto_map ->
    # a remote-code prompt) although only the tokenizer files are needed
    from transformers import PreTrainedTokenizerFast

    from omni_moe.modeling.tokenizer_utils import ensure_special_tokens

    spec = recipe.model.tokenizer
    if source is not None or isinstance(spec, str):
        tokenizer = PreTrainedTokenizerFast.from_pretrained(str(source if source is not None else spec))
        # a pretrained LLM's tokenizer (e.g. Qwen2.5's) lacks our media placeholders: add them (appended, so every
        # rank gets the same ids; a model folder of an earlier stage has them already and nothing changes)
        ensure_special_tokens(tokenizer)
        return tokenizer
    folder = Path(recipe.run.output_dir) / "tokenizer"
    if get_rank() == 0 and not (folder / "tokenizer_config.json").is_file():
        from omni_moe.data.tokenizer import build_bpe_tokenizer

        manifest = Path(spec["bpe_from"])
        if not manifest.is_file():
            raise FileNotFoundError(f"model.tokenizer.bpe_from: manifest {manifest} not found")
        build_bpe_tokenizer(manifest_texts(manifest), vocab_size=int(spec.get("vocab_size", 512)),
                            out_dir=str(folder))
    barrier()
    return PreTrainedTokenizerFast.from_pretrained(str(folder))


def placeholder_ids(tokenizer) -> dict[str, int]:
    """The media placeholder token ids of our tokenizers, as OmniMoeConfig fields."""
    from omni_moe.modeling.tokenizer_utils import AUDIO_TOKEN, IMAGE_TOKEN, VIDEO_TOKEN

    return {key: tokenizer.convert_tokens_to_ids(token) for key, token in
            (("image_token_id", IMAGE_TOKEN), ("video_token_id", VIDEO_TOKEN), ("audio_token_id", AUDIO_TOKEN))}


def _token_fields(recipe: Recipe, tokenizer) -> dict[str, Any]:
    """vocab size, placeholder, pad and eos ids: from the tokenizer, or (a plan without one) from the BPE spec."""
    if tokenizer is not None:
        return {"vocab_size": len(tokenizer), **placeholder_ids(tokenizer), "pad_token_id": tokenizer.pad_token_id,
                "eos_token_id": tokenizer.eos_token_id}
    spec = recipe.model.tokenizer
    vocab = int(spec.get("vocab_size", 512)) if isinstance(spec, dict) else 512
    return {"vocab_size": vocab, "image_token_id": vocab - 1, "video_token_id": vocab - 2, "audio_token_id": vocab - 3}


# ----------------------------------------------------------------------------- the model plan
@dataclass
class ModelPlan:
    """What a stage trains, from config files alone. `kind`: dense_llm | config | upcycle | folder."""

    kind: str
    config: Any  # OmniMoeConfig
    origin: str  # for people: where the weights come from
    folder: str | None = None  # kind folder: the model folder; kind upcycle: the dense checkpoint
    upcycle: dict = field(default_factory=dict)  # kind upcycle: the arguments of upcycle(folder, **upcycle)


@contextlib.contextmanager
def quiet_transformers():
    """Hide transformers' log lines and warnings that say nothing about the recipe (e.g. a SigLIP checkpoint's
    unused text-tower token ids, a deprecation inside PEFT)."""
    from transformers.utils import logging as hf_logging

    previous = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            yield
    finally:
        hf_logging.set_verbosity(previous)


def plan_model(recipe: Recipe, stage, tokenizer=None, *, source: str | Path | None = None,
               dense_source: str | Path | None = None) -> ModelPlan:
    """The model `stage` trains. `source`: the previous stage's exported MoE model; `dense_source`: a dense_pretrain
    stage's exported LLM (this stage upcycles it). Without a tokenizer (the dry run) the vocabulary comes from the
    BPE spec."""
    from omni_moe.modeling.configuration_omni import OmniMoeConfig

    model = recipe.model
    tokens = _token_fields(recipe, tokenizer)
    if stage.preset == "dense_pretrain":
        # Qwen2 fields; q/k/v biases as in Qwen2: the decoder our parity tests hold equal to Qwen2ForCausalLM
        fields = {"attention_bias": True, **model.dense, **DENSE_LLM_FIXED, "vocab_size": tokens["vocab_size"]}
        if tokenizer is not None:
            fields.update(pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
        return ModelPlan("dense_llm", OmniMoeConfig(**fields), "dense LLM of a dense_pretrain stage (model.dense)")
    folder = source if source is not None else model.from_
    if folder is not None:
        what = "the previous stage's export" if source is not None else "model.from"
        return ModelPlan("folder", OmniMoeConfig.from_pretrained(str(folder)), f"loaded from {folder} ({what})",
                         folder=str(folder))
    if model.upcycle is not None:
        return _upcycle_plan(recipe, tokens, dense_source)
    fields = dict(model.config)
    for key, value in tokens.items():
        fields.setdefault(key, value)
    return ModelPlan("config", OmniMoeConfig(**fields), "built from model.config (fresh weights, seed run.seed)")


def _upcycle_plan(recipe: Recipe, tokens: dict, dense_source: str | Path | None) -> ModelPlan:
    """The config `omni_moe.modeling.upcycle.upcycle` builds from the same arguments (held equal by a test)."""
    from transformers import AutoConfig

    from omni_moe.modeling.configuration_omni import OmniMoeConfig
    from omni_moe.modeling.upcycle import dense_llm_fields, encoder_config

    spec = dict(recipe.model.upcycle)
    spec.setdefault("seed", recipe.run.seed)
    for key in ("image_token_id", "video_token_id", "audio_token_id"):
        spec.setdefault(key, tokens[key])
    dense_path = str(dense_source) if dense_source is not None else spec.get("dense_path")
    arguments = {k: v for k, v in spec.items() if k != "dense_path"}  # upcycle(dense_path, **arguments)
    moe = {k: v for k, v in arguments.items() if k not in UPCYCLE_OPTIONS}
    if dense_path is not None:
        llm = dense_llm_fields(AutoConfig.from_pretrained(dense_path))
        origin = f"upcycled from {dense_path}"
    else:  # a plan before the dense_pretrain stage has run: its config comes from model.dense
        llm = {"attention_bias": True, **recipe.model.dense, "vocab_size": tokens["vocab_size"]}
        origin = "upcycled from the dense_pretrain stage's LLM (model.dense)"
    for kind in ("vision", "audio"):
        if arguments.get(f"{kind}_path"):
            with quiet_transformers():
                moe[f"{kind}_config"] = encoder_config(arguments[f"{kind}_path"], kind)
            origin += f", {kind} tower from {arguments[f'{kind}_path']}"
    return ModelPlan("upcycle", OmniMoeConfig(**{**llm, **moe}), origin, folder=dense_path, upcycle=arguments)


def meta_model(plan: ModelPlan):
    """The planned model with every tensor on the meta device: real shapes, no memory, no initialisation cost."""
    from omni_moe.modeling.modeling_omni import OmniMoeForCausalLM

    with torch.device("meta"):
        return OmniMoeForCausalLM(plan.config)


def build_model(plan: ModelPlan, dtype: torch.dtype):
    """The planned model with its weights, in the run's precision: a bf16 run never holds an fp32 copy of the model
    (at real scale, 63 GB per rank), whatever dtype a folder was saved in. Every rank builds the same weights (the
    caller seeds every rank alike)."""
    from omni_moe.modeling.modeling_omni import OmniMoeForCausalLM

    if plan.kind == "folder":
        return OmniMoeForCausalLM.from_pretrained(plan.folder, dtype=dtype)
    if plan.kind == "upcycle":
        from omni_moe.modeling.upcycle import upcycle

        # placeholder ids past the checkpoint's embeddings fail in OmniMoeConfig, before any weights are built
        return upcycle(plan.folder, **plan.upcycle, dtype=dtype)
    return OmniMoeForCausalLM._from_config(plan.config, dtype=dtype)


def compute_dtype(recipe: Recipe) -> torch.dtype:
    return torch.bfloat16 if recipe.parallel.precision == "bf16" else torch.float32


# ----------------------------------------------------------------------------- data
def build_loader(recipe: Recipe, stage, processor, stage_index: int, strip_media: bool = False):
    """This rank's resumable loader over the stage's weighted mix (a fixed-length epoch per rank); `strip_media`:
    the samples' text alone (a dense LLM)."""
    from omni_moe.data.batching import make_batching
    from omni_moe.data.collate import OmniCollator
    from omni_moe.data.loader import ResumableLoader
    from omni_moe.data.mixing import MixedShardDataset

    entries = stage.data or tuple({"source": name, "weight": 1.0} for name in recipe.data.sources)
    sources = {e["source"]: recipe.data.sources[e["source"]] for e in entries}
    weights = {e["source"]: float(e.get("weight", 1.0)) for e in entries}
    collator = OmniCollator(processor, max_length=recipe.data.max_length, strip_media=strip_media)
    dataset = MixedShardDataset(
        sources, weights, samples_per_epoch=recipe.data.samples_per_epoch, rank=get_rank(),
        world_size=get_world_size(), seed=recipe.data.seed + stage_index, shuffle_buffer=recipe.data.shuffle_buffer,
        transform=collator.measure,
    )
    # drop_last: a short last batch would be the only odd-shaped step of an epoch
    return ResumableLoader(dataset, batching=make_batching(**recipe.data.batching), collate_fn=collator,
                           num_workers=recipe.data.num_workers, drop_last=True)


def check_local_world_size(recipe: Recipe, environ: dict) -> None:
    """run.nproc_per_node against the launcher's LOCAL_WORLD_SIZE: a recipe planned for 8 ranks a node launched on
    4-GPU nodes would silently stretch an EP=8 group across nodes (all-to-alls over the slow link)."""
    local = environ.get("LOCAL_WORLD_SIZE")
    if local is not None and int(local) != recipe.run.nproc_per_node:
        raise RecipeError(f"{recipe.path}: run.nproc_per_node is {recipe.run.nproc_per_node} but the launcher "
                          f"started {local} processes on this node (LOCAL_WORLD_SIZE); set run.nproc_per_node="
                          f"{local} or launch {recipe.run.nproc_per_node} per node")


__all__ = ["ModelPlan", "build_loader", "build_model", "check_local_world_size", "compute_dtype", "load_tokenizer",
           "manifest_texts", "meta_model", "placeholder_ids", "plan_model", "quiet_transformers"]
