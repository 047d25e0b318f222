"""`omni train` end to end on real processes (2 ranks, EP=2, ZeRO-1/2, fp32, gloo), incl. crash/restart.

One tiny synthetic dataset (omni_moe.data.synth + build_shards) is shared. Launches:
  * full: the loop recipe (tests/distributed/loop_recipe.yaml), all three stages, a few steps each (`omni train` re-launches itself via torchrun);
  * straight: one stage of 12 steps (the reference);
  * split: the same with train.stop_after_steps=6, then the same command again (automatic resume);
Every step's loss comes from OUTPUT/<stage>/losses.jsonl (rank 0; a restarted run appends the steps it repeats, so the
last entry per step counts), final weights from OUTPUT/<stage>/model.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.launching import launcher_env, run_in_session, small_synth_shards

RECIPE = "tests/distributed/loop_recipe.yaml"
SINGLE_STAGE = "stages=[{name: experts, preset: modality_experts, steps: 12, optimizer: {lr: 1.0e-2, warmup_steps: 1}}]"
LAUNCH_TIMEOUT_S = 240


def _launch(command: list[str], extra_env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return run_in_session(command, timeout_s=LAUNCH_TIMEOUT_S, env=launcher_env(**(extra_env or {})), check=False)


def omni_train(data: dict, output: Path, *overrides: str, extra_env=None):
    """`omni train` on the loop recipe with test-sized overrides (it re-launches itself through torchrun)."""
    args = [RECIPE, f"run.output_dir={output}", f"model.tokenizer.bpe_from={data['manifest']}",
            f"data.sources.synth={data['shards']}", "data.samples_per_epoch=8", "train.log_every=1",
            "train.save_every=2", *overrides]
    result = _launch([sys.executable, "-m", "omni.cli", "train", *args], extra_env)
    assert result.returncode == 0, result.stdout[-8000:]
    return result


def losses(output: Path, stage: str) -> dict[int, float]:
    by_step = {}
    for line in (output / stage / "losses.jsonl").read_text().splitlines():
        entry = json.loads(line)
        by_step[entry["step"]] = entry["loss"]  # the last entry of a repeated step wins
    return by_step


def weights(output: Path, stage: str) -> dict[str, torch.Tensor]:
    return load_file(str(output / stage / "model" / "model.safetensors"))


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict:
    return small_synth_shards(tmp_path_factory.mktemp("synth"))


@pytest.fixture(scope="module")
def straight(data, tmp_path_factory) -> Path:
    output = tmp_path_factory.mktemp("straight")
    omni_train(data, output, SINGLE_STAGE)
    return output


@pytest.mark.timeout(300)
def test_full_recipe_runs_every_stage_and_exports_loadable_models(data, tmp_path):
    """(a) The loop recipe, 3 stages x 8 steps on 2 processes (EP=2): each stage's loss falls (mean of the first
    two steps vs the last two; the data repeats every 2 steps), TensorBoard has train/loss and router scalars, and
    each stage's folder loads with OmniMoeForCausalLM.from_pretrained. A re-run skips the finished stages."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from omni_moe.modeling.modeling_omni import OmniMoeForCausalLM

    stages = ("alignment", "modality_experts", "mixed_lora")
    overrides = [f"stages.{i}.{key}" for i in range(3) for key in ("steps=8", "optimizer.lr=1.0e-2")]
    omni_train(data, tmp_path, *overrides)
    for stage in stages:
        by_step = losses(tmp_path, stage)
        assert sorted(by_step) == list(range(1, 9)), (stage, by_step)
        first, last = (by_step[1] + by_step[2]) / 2, (by_step[7] + by_step[8]) / 2
        assert last < first - 0.05, (stage, by_step)
        events = EventAccumulator(str(tmp_path / stage / "tensorboard"))
        events.Reload()
        tags = set(events.Tags()["scalars"])
        assert {"train/loss", "train/lr", "train/grad_norm", "train/tokens_per_s", "data/accepted"} <= tags, tags
        assert any(t.startswith("router/layer0/") for t in tags) and "router/max_over_mean" in tags, tags
        assert [e.step for e in events.Scalars("train/loss")] == list(range(1, 9))
        assert json.loads((tmp_path / stage / "DONE.json").read_text())["steps"] == 8
        model = OmniMoeForCausalLM.from_pretrained(str(tmp_path / stage / "model"))
        assert model.config.num_routed_experts == 10 and not any(torch.isnan(p).any() for p in model.parameters())
    again = omni_train(data, tmp_path, *overrides)
    assert all(f"stage {s} already done" in again.stdout for s in stages), again.stdout[-3000:]


@pytest.mark.timeout(300)
def test_split_resume_through_the_loop_equals_straight_run(data, straight, tmp_path):
    """(c) split resume == straight run, through `omni train`: 12 steps straight vs 6 (train.stop_after_steps=6), stop, the same
    command again -> every loss `==` and the exported weights `torch.equal`."""
    first = omni_train(data, tmp_path, SINGLE_STAGE, "train.stop_after_steps=6")
    assert "stopped at step 6" in first.stdout
    assert sorted(losses(tmp_path, "experts")) == list(range(1, 7))
    assert not (tmp_path / "experts" / "model").exists()
    second = omni_train(data, tmp_path, SINGLE_STAGE)
    assert "resumed from" in second.stdout and "at step 6" in second.stdout, second.stdout[-3000:]
    reference = losses(straight, "experts")
    assert sorted(reference) == list(range(1, 13))
    assert losses(tmp_path, "experts") == reference
    assert reference[12] < reference[1]
    want, got = weights(straight, "experts"), weights(tmp_path, "experts")
    assert want.keys() == got.keys()
    unequal = [k for k in want if not torch.equal(want[k], got[k])]
    assert not unequal, unequal[:5]


@pytest.mark.timeout(300)
def test_zero2_with_different_media_per_rank_matches_zero1(data, tmp_path):
    """ZeRO-2 reduces gradient buckets in the order backward produces them; with micro-batches of 2 mixed samples
    the ranks' batches hold different media (one rank has audio, the other none), which used to give the ranks
    different bucket orders (a gloo size mismatch, or silently misaligned sums). With every tower in every graph
    (`run_every_tower`) ZeRO-2 gives the ZeRO-1 run's losses and weights."""
    # the encoders train (they start random): their gradients are the ones whose order depends on the media
    stage = ("stages=[{name: towers, preset: {name: modality_experts, encoders_pretrained: false}, steps: 8, "
             "optimizer: {lr: 1.0e-2, warmup_steps: 1}}]")
    omni_train(data, tmp_path, stage, "parallel.zero_stage=2", "data.batching.batch_size=2")
    zero1 = tmp_path.parent / (tmp_path.name + "-zero1")
    omni_train(data, zero1, stage, "data.batching.batch_size=2")
    got, want = losses(tmp_path, "towers"), losses(zero1, "towers")
    assert sorted(got) == list(range(1, 9))
    assert all(abs(got[s] - want[s]) <= 1e-5 * abs(want[s]) for s in want), (got, want)
    w1, w2 = weights(zero1, "towers"), weights(tmp_path, "towers")
    assert max((w1[k] - w2[k]).abs().max().item() for k in w1) <= 1e-5


@pytest.mark.timeout(400)
def test_aux_free_bias_moves_every_step_and_resumes_exactly(data, tmp_path):
    """`moe.aux_free_bias`: after each optimizer step every MoE layer's selection bias moves by +-rate (or 0) per
    expert, from the loads of every rank's tokens (so the replicated buffers agree); the bias is in the
    checkpoint, so a run stopped at step 3 and resumed ends with the straight run's losses and biases."""
    rate, steps = 0.01, 6
    stage = (f"stages=[{{name: biased, preset: modality_experts, steps: {steps}, "
             f"moe: {{aux_free_bias: true, aux_free_bias_rate: {rate}}}, optimizer: {{lr: 1.0e-2, warmup_steps: 1}}}}]")
    straight = tmp_path / "straight"
    omni_train(data, straight, stage)
    split = tmp_path / "split"
    omni_train(data, split, stage, "train.stop_after_steps=3")
    omni_train(data, split, stage)
    assert losses(split, "biased") == losses(straight, "biased")

    want, got = weights(straight, "biased"), weights(split, "biased")
    biases = {k: v for k, v in want.items() if k.endswith("gate.e_score_correction_bias")}
    assert len(biases) == 2, sorted(want)  # one per MoE layer of the loop recipe
    for key, bias in biases.items():
        assert torch.equal(got[key], bias), key
        in_steps = bias.double() / rate
        assert torch.allclose(in_steps, in_steps.round(), atol=1e-3), (key, bias)  # whole +-rate moves
        assert in_steps.abs().max() <= steps and in_steps.abs().sum() > 0, (key, bias)
        assert bias[-1] == 0.0, (key, bias)  # the null expert's column is never biased
    config = json.loads((straight / "biased" / "model" / "config.json").read_text())
    assert config["aux_free_bias"] is True
