"""Every path a recipe names is checked before any process starts (training/recipe_paths.py), with the key and the path.

Through `omni train` itself: a missing or wrong model folder ends with exit code 2 and a message naming the recipe
key, the path and the reason (today's alternative was a huggingface_hub traceback about repo ids), and the checks
pass for folders that are right.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from omni.cli import main
from omni_moe.training.recipe import RecipeError, load_recipe
from omni_moe.training.recipe_paths import check_recipe_paths
from tests.unit.test_dry_run import QWEN25_7B_INSTRUCT, RECIPE, SIGLIP_SO400M_384, WHISPER_LARGE_V3

TINY = Path(__file__).resolve().parents[2] / "recipes" / "tiny_omni.yaml"


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("paths")
    made = {}
    for name, config in (("qwen", QWEN25_7B_INSTRUCT), ("siglip", SIGLIP_SO400M_384), ("whisper", WHISPER_LARGE_V3),
                         ("llama_like_gpt2", {"model_type": "gpt2"})):
        (root / name).mkdir()
        (root / name / "config.json").write_text(json.dumps(config))
        made[name] = root / name
    (root / "tok").mkdir()
    (root / "tok" / "tokenizer.json").write_text("{}")
    made["tok"], made["root"] = root / "tok", root
    return made


def real_scale(folders, **paths) -> list[str]:
    values = {"dense_path": folders["qwen"], "vision_path": folders["siglip"], "audio_path": folders["whisper"],
              **paths}
    return [f"model.upcycle.{k}={v}" for k, v in values.items()] + [
        f"model.tokenizer={folders['tok']}", f"run.output_dir={folders['root'] / 'run'}"]


def test_the_dry_run_names_a_missing_model_folder_by_its_key(folders, capsys, monkeypatch):
    monkeypatch.setenv("NNODES", "1")
    missing = folders["root"] / "not-here"
    assert main(["train", str(RECIPE), "--dry-run", *real_scale(folders, vision_path=missing)]) == 2
    err = capsys.readouterr().err
    assert f"model.upcycle.vision_path: {missing} does not exist" in err and "HFValidationError" not in err
    # real_scale.yaml's data sources do not exist here, nor tokenizer files: the dry run needs neither
    assert main(["train", str(RECIPE), "--dry-run", *real_scale(folders)]) == 0


@pytest.mark.parametrize("key, folder, message", [
    ("dense_path", "llama_like_gpt2", "holds model_type 'gpt2'; supported: qwen2, llama"),
    ("dense_path", "tok", "has no config.json"),
    ("audio_path", "siglip", "holds model_type 'siglip'; supported: whisper"),
    ("vision_path", "whisper", "holds model_type 'whisper'; supported: clip_vision_model, siglip_vision_model, clip"),
])
def test_a_model_folder_of_the_wrong_kind_is_named(folders, key, folder, message):
    recipe = load_recipe(RECIPE, real_scale(folders, **{key: folders[folder]}))
    with pytest.raises(RecipeError, match=f"model.upcycle.{key}: {folders[folder]} {message}"):
        check_recipe_paths(recipe, plan_only=True)


def test_a_real_run_also_needs_its_data_and_lists_every_problem(folders):
    recipe = load_recipe(RECIPE, real_scale(folders) + [f"model.tokenizer={folders['root'] / 'no-tokenizer'}"])
    with pytest.raises(RecipeError) as err:
        check_recipe_paths(recipe)
    lines = str(err.value).splitlines()
    assert f"  model.tokenizer: {folders['root'] / 'no-tokenizer'} is not a folder" in lines
    assert "  data.sources.image_caption: /data/omni/shards/image_caption is not a folder of shards" in lines
    assert len([line for line in lines if line.startswith("  data.sources.")]) == len(recipe.data.sources)


def test_paths_the_run_makes_itself_need_not_exist_yet(tmp_path, monkeypatch):
    """tiny_omni.yaml's tokenizer manifest, shards and eval data all live under data.synth.out, made by omni train."""
    monkeypatch.chdir(tmp_path)
    check_recipe_paths(load_recipe(TINY))
    with pytest.raises(RecipeError, match="eval.data: elsewhere is not a folder"):
        check_recipe_paths(load_recipe(TINY, ["eval.data=elsewhere"]))
