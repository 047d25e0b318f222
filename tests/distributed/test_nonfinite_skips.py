"""Non-finite gradients with a finite loss are counted, never trained through silently.

At ZeRO-1/2, fp32 and bf16, DeepSpeed skips such a step by itself (`engine.skipped_steps` grows). The training loop
(`train_stage`, for real: 2 ranks, EP 2, the loop recipe's tiny model on a real shard loader) must count each as a
non-finite skip and abort after `max_nonfinite_in_a_row` of them, naming the step, instead of finishing the stage.
The inf gradients come from hooks on rank 1's parameters only; the ranks' reduction spreads it.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.launching import small_synth_shards

TARGET = "tests.distributed.test_nonfinite_skips"
CONFIGS = [(1, "fp32"), (2, "fp32"), (1, "bf16"), (2, "bf16")]


def worker_train_through_inf_gradients(rank: int, world: int, args: dict) -> dict:
    import torch

    from omni_moe.training.recipe import load_recipe
    from omni_moe.training.loop import NonFiniteAbort
    from omni_moe.training.pipeline import build_stage, train_built_stage

    outcomes = {}
    for zero, precision in CONFIGS:
        output = Path(args["root"]) / f"zero{zero}_{precision}"
        recipe = load_recipe("tests/distributed/loop_recipe.yaml", [
            f"run.output_dir={output}", f"model.tokenizer.bpe_from={args['manifest']}",
            f"data.sources.synth={args['shards']}", "data.samples_per_epoch=16", f"parallel.zero_stage={zero}",
            f"parallel.precision={precision}", "train.max_nonfinite_in_a_row=2", "train.tensorboard=false",
            "stages=[{name: experts, preset: modality_experts, steps: 2, optimizer: {lr: 1.0e-2, warmup_steps: 0}}]"])
        built = build_stage(recipe, 0)
        if rank == 1:  # whichever parameters the stage trains
            for param in filter(lambda p: p.requires_grad, built.model.parameters()):
                param.register_hook(lambda grad: torch.full_like(grad, float("inf")))
        try:
            result = train_built_stage(recipe, 0, built)
            outcomes[f"{zero}/{precision}"] = f"finished {result.state.step} steps"
        except NonFiniteAbort as exc:
            outcomes[f"{zero}/{precision}"] = str(exc)
    return outcomes


@pytest.mark.timeout(300)
def test_deepspeed_skipped_steps_count_and_abort_at_zero1_and_zero2(spawn, tmp_path):
    data = small_synth_shards(tmp_path / "synth")
    results = spawn(f"{TARGET}:worker_train_through_inf_gradients", 2, {"root": str(tmp_path), **data},
                    timeout_s=280, pg_timeout_s=60, init="deepspeed")
    for rank, outcomes in enumerate(results):
        for config, outcome in outcomes.items():
            assert outcome.startswith("stage experts: 2 non-finite steps or micro-batches in a row, the last at "
                                      "step 1 (non-finite gradients"), (rank, config, outcome)
