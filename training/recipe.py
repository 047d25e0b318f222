"""Training recipes: one YAML file per run, read into typed sections, with dotted command-line overrides.

    run:       output_dir, seed (model initialisation and upcycling noise -- identical on every rank -- then each
               rank's Python / NumPy / torch streams as seed + stage index + rank; data order has data.seed),
               nproc_per_node (processes per node; checked against the launcher's LOCAL_WORLD_SIZE)
    model:     exactly one of  config (OmniMoeConfig fields; vision_config / audio_config as dicts with model_type)
                                + tokenizer,
                               upcycle {dense_path, vision_path, audio_path, expert_init, noise_std, ...MoE fields},
                               from (a previous stage's output / an exported HF folder with tokenizer + processor)
               tokenizer: a tokenizer folder, or {bpe_from: MANIFEST.jsonl, vocab_size: N} (a byte-level BPE trained
               on the manifest's conversation texts; deterministic, so every rank builds the same one)
    data:      sources {name: shard dir or list of them; relative to `root` when given},
               synth {out, num, seed, eval_num, max_samples_per_shard}
               (the synthetic dataset, made by `omni train` when missing), batching {strategy, batch_size, max_tokens, lookahead, packing,
               max_length}, samples_per_epoch (per rank), max_length, num_workers, seed
    parallel:  ep_size, zero_stage, precision
    train:     gradient_accumulation_steps, save_every, keep_last, log_every,
               activation_checkpointing, stop_after_steps, ... (see `TrainSection`)
    eval:      held-out evaluation after every stage (`EvalSection`)
    stages:    a list parsed by `omni_moe.training.stage_spec.parse_stages` (each stage's `data:` weights name `data.sources`;
               its `optimizer:` holds the LR schedule and `grad_clip`, the one clipping key)

`model.config`, `model.upcycle` and `model.dense` are checked against OmniMoeConfig's fields (and upcycle's own
options): a misspelt field is an error naming it, never a silently ignored attribute.

Overrides (`omni train RECIPE train.save_every=2 stages.0.steps=10`) are applied to the raw YAML before validation;
values are parsed as YAML scalars (`1e-3` -> float, `true` -> bool, `[a, b]` -> list, `null` -> None). Every error
names the offending key.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .stage_spec import StageConfigError, StageSpec, parse_stages

_FLOAT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")
SECTIONS = ("run", "model", "data", "parallel", "train", "eval", "stages")


class RecipeError(ValueError):
    """A recipe (or an override) is malformed; the message names the file and the key."""


@dataclass
class RunSection:
    output_dir: str
    seed: int = 0
    nproc_per_node: int = 1


@dataclass
class ModelSection:
    config: dict | None = None
    tokenizer: str | dict | None = None
    upcycle: dict | None = None
    from_: str | None = None  # YAML key `from`
    # Qwen2 fields of the dense LLM a `dense_pretrain` stage trains from scratch (only where no pretrained LLM exists)
    dense: dict | None = None


@dataclass
class DataSection:
    sources: dict
    batching: dict = field(default_factory=lambda: {"strategy": "mixed", "batch_size": 8})
    samples_per_epoch: int = 1024
    max_length: int | None = None
    num_workers: int = 0
    seed: int = 0
    shuffle_buffer: int = 256
    # {out, num, seed, eval_num, max_samples_per_shard}: `omni train` makes the synthetic dataset (shards by task)
    # there if it is missing; every source needs a shard per rank x dataloader worker
    synth: dict | None = None
    # the folder relative `sources` paths are read from (one override moves a whole dataset)
    root: str | None = None


@dataclass
class EvalSection:
    """Held-out evaluation after every stage (`omni eval`'s code) and chat examples from the final export."""

    data: str | None = None          # a dataset folder with <split>.jsonl (e.g. the synth `out`)
    split: str = "val"
    limit: int | None = None         # samples evaluated after each stage (None: the whole split)
    final_limit: int | None = None   # samples evaluated after the last stage (None: the whole split)
    batch_size: int = 64
    max_new_tokens: int = 16
    examples: int = 4                # chat answers printed from the exported model


@dataclass
class ParallelSection:
    ep_size: int = 1
    zero_stage: int = 1
    precision: str = "fp32"


@dataclass
class TrainSection:
    gradient_accumulation_steps: int = 1
    save_every: int = 100
    keep_last: int = 2
    log_every: int = 10
    activation_checkpointing: bool = False
    # leave after this many optimizer steps in one invocation (a checkpoint is saved); re-run to continue
    stop_after_steps: int | None = None
    max_nonfinite_in_a_row: int = 5
    spike_factor: float = 5.0
    router_alarm_max_over_mean: float = 4.0
    timeout_s: float = 1800.0
    tensorboard: bool = True
    # model-config keys (dotted for sub-configs, e.g. rope_theta, vision_config.image_size) that may differ from
    # a checkpoint's when resuming it; any other difference refuses the resume (training/checkpointing.py)
    resume_allow_config_changes: list = dataclasses.field(default_factory=list)


@dataclass
class Recipe:
    run: RunSection
    model: ModelSection
    data: DataSection
    parallel: ParallelSection
    train: TrainSection
    eval: EvalSection
    stages: list[StageSpec]
    raw: dict  # the validated YAML (after overrides), for printing and for saving next to the run
    path: str = ""


# ----------------------------------------------------------------------------- validation
def _type_ok(value: Any, hint: Any) -> bool:
    origin = typing.get_origin(hint)
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        return any(_type_ok(value, arm) for arm in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if origin is not None:
        return isinstance(value, origin)
    return isinstance(value, hint)


def _type_name(hint: Any) -> str:
    args = typing.get_args(hint)
    if args:
        return " or ".join("null" if a is type(None) else getattr(a, "__name__", str(a)) for a in args)
    return getattr(hint, "__name__", str(hint))


def _section(cls: type, raw: Any, where: str, fail) -> Any:
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        fail(f"{where}: expected a mapping, got {type(raw).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name.rstrip("_"): f for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        fail(f"unknown key {where}.{unknown[0]}; {where} has {sorted(fields)}")
    values = {}
    for key, f in fields.items():
        if key not in raw:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                fail(f"missing key {where}.{key}")
            continue
        if not _type_ok(raw[key], hints[f.name]):
            fail(f"{where}.{key} must be {_type_name(hints[f.name])}, got {raw[key]!r}")
        values[f.name] = raw[key]
    return cls(**values)


def _check_values(recipe: Recipe, fail) -> None:
    positive = {"run.nproc_per_node": recipe.run.nproc_per_node, "parallel.ep_size": recipe.parallel.ep_size,
                "train.gradient_accumulation_steps": recipe.train.gradient_accumulation_steps,
                "train.save_every": recipe.train.save_every, "train.keep_last": recipe.train.keep_last,
                "train.log_every": recipe.train.log_every, "data.samples_per_epoch": recipe.data.samples_per_epoch}
    for key, value in positive.items():
        if value < 1:
            fail(f"{key} must be >= 1, got {value}")
    if not all(isinstance(key, str) for key in recipe.train.resume_allow_config_changes):
        fail(f"train.resume_allow_config_changes must be a list of model-config keys, got "
             f"{recipe.train.resume_allow_config_changes!r}")
    if recipe.data.num_workers < 0:
        fail(f"data.num_workers must be >= 0, got {recipe.data.num_workers}")
    if recipe.parallel.precision not in ("fp32", "bf16"):
        fail(f"parallel.precision must be 'fp32' or 'bf16', got {recipe.parallel.precision!r}")
    if recipe.parallel.zero_stage not in (0, 1, 2):
        fail(f"parallel.zero_stage must be 0, 1 or 2 (ZeRO-3 cannot partition expert-parallel MoE), "
             f"got {recipe.parallel.zero_stage}")
    # ep_size must divide the WORLD size (nodes x processes per node), known only at launch: expert parallelism may
    # span nodes. prepare_expert_parallel checks it on every rank.
    if recipe.train.stop_after_steps is not None and recipe.train.stop_after_steps < 1:
        fail(f"train.stop_after_steps must be >= 1 or null, got {recipe.train.stop_after_steps}")
    model = recipe.model
    given = [k for k, v in (("config", model.config), ("upcycle", model.upcycle), ("from", model.from_)) if v]
    if len(given) != 1:
        fail(f"model: give exactly one of config, upcycle or from (got {given or 'none'})")
    if model.from_ is None and model.tokenizer is None:
        fail("model.tokenizer is required with model.config / model.upcycle (a folder or {bpe_from, vocab_size})")
    if isinstance(model.tokenizer, dict):
        unknown = sorted(set(model.tokenizer) - {"bpe_from", "vocab_size"})
        if unknown or "bpe_from" not in model.tokenizer:
            fail(f"model.tokenizer: expected a folder or {{bpe_from: MANIFEST, vocab_size: N}}, got {model.tokenizer}")
    _check_model_fields(model, fail)
    dense_stages = [i for i, st in enumerate(recipe.stages) if st.preset == "dense_pretrain"]
    if dense_stages and (dense_stages != [0] or model.dense is None or model.upcycle is None):
        fail("a dense_pretrain stage must be stages.0, with model.dense (its Qwen2 fields) and model.upcycle "
             "(how the next stage builds the MoE model from it)")
    if model.dense is not None and not dense_stages:
        fail("model.dense is only used by a dense_pretrain stage (stages.0.preset: dense_pretrain)")
    if model.upcycle is not None and "dense_path" not in model.upcycle and not dense_stages:
        fail("missing key model.upcycle.dense_path")
    if not recipe.data.sources:
        fail("data.sources: at least one named shard folder is required")
    for name, path in recipe.data.sources.items():
        if not (isinstance(path, str) or (isinstance(path, list) and path and all(isinstance(p, str) for p in path))):
            fail(f"data.sources.{name} must be a shard folder path or a list of them, got {path!r}")
    synth = recipe.data.synth
    if synth is not None:
        unknown = sorted(set(synth) - {"out", "num", "seed", "eval_num", "max_samples_per_shard"})
        if unknown or "out" not in synth:
            fail(f"data.synth: expected {{out, num, seed, eval_num, max_samples_per_shard}} with out required, "
                 f"got {synth}")
    batching_keys = {"strategy", "batch_size", "max_tokens", "lookahead", "packing", "max_length", "max_batch_size"}
    unknown = sorted(set(recipe.data.batching) - batching_keys)
    if unknown:
        fail(f"unknown key data.batching.{unknown[0]}; data.batching has {sorted(batching_keys)}")
    for i, stage in enumerate(recipe.stages):
        for j, entry in enumerate(stage.data):
            if entry["source"] not in recipe.data.sources:
                fail(f"stages.{i}.data.{j}.source: {entry['source']!r} is not one of data.sources "
                     f"{sorted(recipe.data.sources)}")


# keys of earlier versions, with what replaced them (a clearer error than "unknown key")
REMOVED_KEYS = {"train.gradient_clipping": "clipping is set per stage by stages.N.optimizer.grad_clip (default 1.0; "
                                           "null turns it off)"}
# upcycle()'s own options (modeling/upcycle.py); its other keys are OmniMoeConfig fields
UPCYCLE_OPTIONS = ("dense_path", "vision_path", "audio_path", "expert_init", "noise_std", "seed")
TOKEN_ID_FIELDS = ("image_token_id", "video_token_id", "audio_token_id", "pad_token_id", "bos_token_id",
                   "eos_token_id")


def model_config_fields() -> tuple[list[str], list[str]]:
    """(every OmniMoeConfig field, the LLM fields -- vocab_size .. tie_word_embeddings), in signature order."""
    import inspect

    from omni_moe.modeling.configuration_omni import OmniMoeConfig

    names = [n for n, p in inspect.signature(OmniMoeConfig.__init__).parameters.items()
             if n != "self" and p.kind is not inspect.Parameter.VAR_KEYWORD]
    return names, names[:names.index("tie_word_embeddings") + 1]


def _check_model_fields(model: ModelSection, fail) -> None:
    """OmniMoeConfig accepts unknown keyword arguments (as every transformers config does), so a misspelt field
    would become a silently ignored attribute: every key is checked here instead."""
    every, llm = model_config_fields()
    allowed = {
        "config": set(every),
        "upcycle": (set(every) - set(llm)) | set(UPCYCLE_OPTIONS) | set(TOKEN_ID_FIELDS),
        "dense": set(llm),  # the dense LLM has no experts, media towers or placeholders
    }
    for key, known in allowed.items():
        section = getattr(model, key)
        if section is None:
            continue
        if not isinstance(section, dict):
            fail(f"model.{key} must be a mapping, got {type(section).__name__}")
        unknown = sorted(set(section) - known)
        if unknown:
            close = difflib.get_close_matches(unknown[0], sorted(known), n=1)
            hint = f" (did you mean {close[0]}?)" if close else ""
            fail(f"unknown key model.{key}.{unknown[0]}{hint}; model.{key} takes {_fields_hint(key)}")


def _fields_hint(key: str) -> str:
    return {"config": "OmniMoeConfig fields (modeling/configuration_omni.py)",
            "upcycle": f"{list(UPCYCLE_OPTIONS)} and OmniMoeConfig's MoE / media fields (the LLM fields come from "
                       "the dense checkpoint)",
            "dense": "the LLM fields of OmniMoeConfig (vocab_size .. tie_word_embeddings)"}[key]


def build_recipe(raw: Any, path: str = "<recipe>") -> Recipe:
    """Validate a raw recipe mapping (already overridden) into a `Recipe`."""
    def fail(message: str):
        raise RecipeError(f"{path}: {message}")

    if not isinstance(raw, dict):
        fail(f"a recipe is a mapping with sections {list(SECTIONS)}, got {type(raw).__name__}")
    unknown = sorted(set(raw) - set(SECTIONS))
    if unknown:
        fail(f"unknown key {unknown[0]}; a recipe has the sections {list(SECTIONS)}")
    for key in ("run", "model", "data", "stages"):
        if key not in raw:
            fail(f"missing key {key}")
    for key, replacement in REMOVED_KEYS.items():
        section, _, leaf = key.partition(".")
        if isinstance(raw.get(section), dict) and leaf in raw[section]:
            fail(f"{key} was removed: {replacement}")
    try:
        stages = parse_stages(raw["stages"])
    except StageConfigError as exc:
        fail(f"stages: {exc}")
    recipe = Recipe(
        run=_section(RunSection, raw["run"], "run", fail), model=_section(ModelSection, raw["model"], "model", fail),
        data=_section(DataSection, raw["data"], "data", fail),
        parallel=_section(ParallelSection, raw.get("parallel"), "parallel", fail),
        train=_section(TrainSection, raw.get("train"), "train", fail),
        eval=_section(EvalSection, raw.get("eval"), "eval", fail), stages=stages, raw=raw, path=path,
    )
    _check_values(recipe, fail)
    if recipe.data.root is not None:
        def under_root(path: str) -> str:
            return path if Path(path).is_absolute() else str(Path(recipe.data.root) / path)

        recipe.data.sources = {name: [under_root(p) for p in paths] if isinstance(paths, list) else under_root(paths)
                               for name, paths in recipe.data.sources.items()}
    return recipe


# ----------------------------------------------------------------------------- overrides
def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    """`key.sub.0.leaf=value` assignments applied to (a deep copy of) the raw recipe; list items by index."""
    import copy

    raw = copy.deepcopy(raw)
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise RecipeError(f"override {item!r}: expected KEY=VALUE (e.g. train.save_every=2)")
        try:
            value = yaml.safe_load(text) if text.strip() else None
        except yaml.YAMLError as exc:
            raise RecipeError(f"override {key}: cannot parse the value {text!r} as YAML: {exc}") from None
        if isinstance(value, str) and _FLOAT.fullmatch(value):
            value = float(value)  # PyYAML (YAML 1.1) reads `1e-3` as a string; on a command line it means a number
        parts = key.split(".")
        node: Any = raw
        for depth, part in enumerate(parts):
            here = ".".join(parts[:depth + 1])
            last = depth == len(parts) - 1
            if isinstance(node, list):
                if not part.lstrip("-").isdigit() or not -len(node) <= int(part) < len(node):
                    raise RecipeError(f"override {key}: {here} is not an index into a list of {len(node)} items")
                index = int(part)
                if last:
                    node[index] = value
                else:
                    node = node[index]
            elif isinstance(node, dict):
                if last:
                    node[part] = value
                else:
                    node = node.setdefault(part, {})  # a new key is then reported by validation, by name
            else:
                raise RecipeError(f"override {key}: {'.'.join(parts[:depth])} is a {type(node).__name__}, not a "
                                  f"mapping or list")
    return raw


def load_recipe(path: str | Path, overrides: list[str] | None = None) -> Recipe:
    """Read a recipe file, apply dotted overrides, validate."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise RecipeError(f"recipe file {path} not found") from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise RecipeError(f"{path}: not valid YAML: {exc}") from None
    return build_recipe(apply_overrides(raw or {}, list(overrides or [])), str(path))


__all__ = ["DataSection", "EvalSection", "ModelSection", "ParallelSection", "Recipe", "RecipeError", "RunSection", "TrainSection",
           "apply_overrides", "build_recipe", "load_recipe"]
