"""Every path a recipe names, checked before any process starts, with an error naming the key and the path.

    check_recipe_paths(recipe)                  # omni train: models, tokenizer, data sources, eval data
    check_recipe_paths(recipe, plan_only=True)  # omni train --dry-run: the plan reads the model configs only

A model folder must be a local directory with a config.json whose `model_type` the code that reads it supports
(upcycling's dense LLMs, the vision and audio encoders, or one of our own models for `model.from`). Paths under
`data.synth.out` are made by `omni train` itself (the synthetic dataset and the manifest its tokenizer is trained on),
so they need not exist yet. Without this check a missing path surfaced as a huggingface_hub `HFValidationError`
about repo ids, several calls deep.
"""

from __future__ import annotations

import json
from pathlib import Path

from omni_moe.modeling.configuration_omni import OmniMoeConfig
from omni_moe.modeling.encoders import AUDIO_CHECKPOINT_TYPES, VISION_CHECKPOINT_TYPES
from omni_moe.modeling.upcycle import DENSE_MODEL_TYPES

from .recipe import Recipe, RecipeError

MODEL_FOLDERS = {  # recipe key -> the model types the code reading it supports
    "model.upcycle.dense_path": DENSE_MODEL_TYPES,
    "model.upcycle.vision_path": VISION_CHECKPOINT_TYPES,
    "model.upcycle.audio_path": AUDIO_CHECKPOINT_TYPES,
    "model.from": (OmniMoeConfig.model_type,),
}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


def model_folder_problem(path: str, supported: tuple[str, ...]) -> str | None:
    """Why `path` is not a local model folder of a supported type (None if it is one)."""
    folder = Path(path)
    if not folder.exists():
        return "does not exist (models are read from local folders; nothing is downloaded)"
    if not folder.is_dir():
        return "is not a folder"
    config = folder / "config.json"
    if not config.is_file():
        return "has no config.json"
    try:
        model_type = json.loads(config.read_text(encoding="utf-8")).get("model_type")
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError) as err:
        return f"has an unreadable config.json ({err})"
    if model_type not in supported:
        return f"holds model_type {model_type!r}; supported: {', '.join(supported)}"
    return None


def _made_by_the_run(recipe: Recipe, path: str) -> bool:
    out = (recipe.data.synth or {}).get("out")
    return out is not None and Path(path).resolve().is_relative_to(Path(out).resolve())


def recipe_path_problems(recipe: Recipe, plan_only: bool = False) -> list[str]:
    """'KEY: PATH REASON' for every path of the recipe that the run could not read."""
    problems: list[str] = []
    model = recipe.model
    folders = {"model.from": model.from_, **{f"model.upcycle.{k}": (model.upcycle or {}).get(k)
                                             for k in ("dense_path", "vision_path", "audio_path")}}
    for key, path in folders.items():
        if path:
            problem = model_folder_problem(str(path), MODEL_FOLDERS[key])
            if problem:
                problems.append(f"{key}: {path} {problem}")
    if plan_only:
        return problems
    tokenizer = model.tokenizer
    if isinstance(tokenizer, str):
        folder = Path(tokenizer)
        if not folder.is_dir():
            problems.append(f"model.tokenizer: {tokenizer} is not a folder")
        elif not any((folder / name).is_file() for name in TOKENIZER_FILES):
            problems.append(f"model.tokenizer: {tokenizer} has none of {', '.join(TOKENIZER_FILES)}")
    elif isinstance(tokenizer, dict) and tokenizer.get("bpe_from"):
        manifest = str(tokenizer["bpe_from"])
        if not Path(manifest).is_file() and not _made_by_the_run(recipe, manifest):
            problems.append(f"model.tokenizer.bpe_from: {manifest} is not a file")
    for name, paths in recipe.data.sources.items():
        for path in [paths] if isinstance(paths, str) else paths:
            if not Path(path).is_dir() and not _made_by_the_run(recipe, path):
                problems.append(f"data.sources.{name}: {path} is not a folder of shards")
    eval_data = recipe.eval.data
    if eval_data and not Path(eval_data).is_dir() and not _made_by_the_run(recipe, eval_data):
        problems.append(f"eval.data: {eval_data} is not a folder")
    return problems


def check_recipe_paths(recipe: Recipe, plan_only: bool = False) -> None:
    """Raise a RecipeError listing every unreadable path (`plan_only`: the model folders alone)."""
    problems = recipe_path_problems(recipe, plan_only)
    if problems:
        raise RecipeError(f"{recipe.path}: " + ("\n  ".join(["paths the run cannot read:", *problems])))
