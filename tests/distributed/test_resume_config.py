"""Resuming a checkpoint with another model config is refused, naming the keys, unless the recipe lists them in
`train.resume_allow_config_changes` (then the resume goes ahead). One rank, the loop recipe's model, real
`train_stage` (DeepSpeed, checkpoints) and a real shard loader; shapes are unchanged by both edits, so only the
check stops the load. The checkpoint's model_config.json records no local `_name_or_path`."""

from __future__ import annotations

import json
import re
from pathlib import Path

from tests.launching import small_synth_shards

TARGET = "tests.distributed.test_resume_config"


def worker_resume_with_changed_config(rank: int, world: int, args: dict) -> dict:
    from omni_moe.training.recipe import load_recipe
    from omni_moe.training.pipeline import build_stage, train_built_stage
    from omni_moe.training.resume_config import ResumeConfigMismatch

    def stage(*overrides: str):
        recipe = load_recipe("tests/distributed/loop_recipe.yaml", [
            f"run.output_dir={args['root']}/run", f"model.tokenizer.bpe_from={args['manifest']}",
            f"data.sources.synth={args['shards']}", "data.samples_per_epoch=8", "parallel.ep_size=1",
            "train.tensorboard=false", "train.stop_after_steps=1",
            "stages=[{name: experts, preset: modality_experts, steps: 2, optimizer: {lr: 1.0e-2, warmup_steps: 0}}]",
            *overrides])
        return train_built_stage(recipe, 0, build_stage(recipe, 0))

    first = stage()  # step 1, checkpointed
    changed = ("model.config.num_experts_per_tok=1", "model.config.rope_theta=5000.0")
    try:
        stage(*changed)
        refused = ""
    except ResumeConfigMismatch as exc:
        refused = str(exc)
    resumed = stage(*changed, "train.resume_allow_config_changes=[num_experts_per_tok, rope_theta]")
    return {"first": first.state.step, "refused": refused, "resumed": resumed.state.step}


def test_resume_with_a_changed_model_config_is_refused_unless_the_recipe_allows_it(spawn, tmp_path):
    data = small_synth_shards(tmp_path / "synth")
    [result] = spawn(f"{TARGET}:worker_resume_with_changed_config", 1, {"root": str(tmp_path), **data},
                     timeout_s=240, pg_timeout_s=60, init="deepspeed")
    assert result["first"] == 1
    assert "num_experts_per_tok: checkpoint 2, now 1" in result["refused"], result["refused"]
    assert re.search(r"rope_theta: checkpoint [0-9.]+, now 5000.0", result["refused"])
    assert "train.resume_allow_config_changes" in result["refused"]
    assert result["resumed"] == 2  # resumed from step 1 and ran step 2
    [checkpoint] = sorted((Path(tmp_path) / "run" / "experts" / "checkpoints").glob("step-*"))[-1:]
    assert "_name_or_path" not in (checkpoint / "model_config.json").read_text()
    assert json.loads((checkpoint / "model_config.json").read_text())["num_experts_per_tok"] == 1
