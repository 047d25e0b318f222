"""An exception in one rank's forward ends every rank within seconds with the cause (training/failure_watch.py).

2 ranks, EP 2, the loop recipe's model on a real shard loader, real `train_built_stage`: a forward hook on rank 1 raises
at its second forward pass while rank 0 goes on into the step's expert all-to-all, where it would otherwise wait
for the process-group timeout (90 s here). Rank 0 must end by itself (exit code 1, not the harness's SIGKILL)
printing rank 1's error, well before that timeout.
"""

from __future__ import annotations

import time

import pytest

from tests.launching import small_synth_shards

TARGET = "tests.distributed.test_failure_watch"
PG_TIMEOUT_S = 90


def worker_forward_fails_on_rank_1(rank: int, world: int, args: dict) -> dict:
    from omni_moe.training.recipe import load_recipe
    from omni_moe.training.pipeline import build_stage, train_built_stage

    recipe = load_recipe("tests/distributed/loop_recipe.yaml", [
        f"run.output_dir={args['root']}/run", f"model.tokenizer.bpe_from={args['manifest']}",
        f"data.sources.synth={args['shards']}", "data.samples_per_epoch=16", "train.tensorboard=false",
        "stages=[{name: experts, preset: modality_experts, steps: 4, optimizer: {lr: 1.0e-2, warmup_steps: 0}}]"])
    built = build_stage(recipe, 0)
    calls = []

    def fail_on_the_second_forward(module, inputs):
        calls.append(1)
        if rank == 1 and len(calls) == 2:
            raise RuntimeError("injected failure in rank 1's forward")

    built.model.model.layers[0].register_forward_pre_hook(fail_on_the_second_forward)
    train_built_stage(recipe, 0, built)
    return {}


@pytest.mark.timeout(300)
def test_a_forward_error_on_one_rank_ends_every_rank_with_its_cause(spawn, tmp_path):
    data = small_synth_shards(tmp_path / "synth")
    started = time.monotonic()
    with pytest.raises(Exception) as info:  # conftest's WorkerError (pytest loads conftest under its own name)
        spawn(f"{TARGET}:worker_forward_fails_on_rank_1", 2, {"root": str(tmp_path), **data}, timeout_s=240,
              pg_timeout_s=PG_TIMEOUT_S, init="deepspeed")
    report = str(info.value)
    assert type(info.value).__name__ == "WorkerError", report
    assert "--- rank 0: exit code 1 ---" in report, report
    assert "rank 0: ending this rank because rank 1: RuntimeError: injected failure in rank 1's forward" in report
    assert time.monotonic() - started < PG_TIMEOUT_S
