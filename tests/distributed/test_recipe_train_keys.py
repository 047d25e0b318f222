"""The `train:` section and a stage's `optimizer:` keys shown through the real loop (training/pipeline.py
build_stage + train_built_stage) on the loop recipe's tiny model: one process (EP 1) unless a key needs two.
tests/unit/test_recipe_schema.py points these keys here.
"""

from __future__ import annotations

import re
import time
from pathlib import Path

import pytest

from tests.launching import small_synth_shards

TARGET = "tests.distributed.test_recipe_train_keys"
RECIPE = "tests/distributed/loop_recipe.yaml"
STEPS = 12


def _recipe(args: dict, output: Path, *overrides: str):
    from omni_moe.training.recipe import load_recipe

    return load_recipe(RECIPE, [f"run.output_dir={output}", f"model.tokenizer.bpe_from={args['manifest']}",
                                f"data.sources.synth={args['shards']}", "data.samples_per_epoch=16",
                                "run.nproc_per_node=1", "parallel.ep_size=1", *overrides])


def _scalars(folder: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(folder))
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def worker_train_keys(rank: int, world: int, args: dict) -> dict:
    from omni_moe.training.pipeline import build_stage, train_built_stage

    output = Path(args["root"]) / "keyed"
    recipe = _recipe(args, output, "train.log_every=3", "train.save_every=5", "train.keep_last=2",
                     "train.gradient_accumulation_steps=2", "train.activation_checkpointing=true",
                     "train.spike_factor=0.5", "train.router_alarm_max_over_mean=1.0",
                     f"stages=[{{name: keyed_stage, preset: modality_experts, steps: {STEPS}, "
                     "optimizer: {lr: 1.0e-3, warmup_steps: 0}}]")
    built = build_stage(recipe, 0)
    result = train_built_stage(recipe, 0, built)
    stage_dir = output / "keyed_stage"
    checkpoints = sorted(int(re.findall(r"\d+", p.name)[-1]) for p in (stage_dir / "checkpoints").iterdir()
                         if p.is_dir() and re.fullmatch(r"step-\d+", p.name))
    scalars = _scalars(stage_dir / "tensorboard")

    quiet = Path(args["root"]) / "quiet"
    quiet_recipe = _recipe(args, quiet, "train.tensorboard=false",
                           "stages=[{name: quiet_stage, preset: modality_experts, steps: 2}]")
    train_built_stage(quiet_recipe, 0, build_stage(quiet_recipe, 0))
    return {
        "stage_dir": stage_dir.is_dir(), "checkpoints": checkpoints, "samples_seen": result.state.samples_seen,
        "gradient_accumulation_steps": result.setup.engine.gradient_accumulation_steps(),
        "checkpointing_modules": sum(bool(getattr(m, "gradient_checkpointing", False))
                                    for m in result.model.modules()),
        "loss_steps": [s for s, _ in scalars["train/loss"]],
        "spike_steps": [s for s, _ in scalars.get("train/loss_spike", [])],
        "alarms": [v for _, v in scalars["router/alarms"]],
        "quiet_files": sorted(str(p.relative_to(quiet)) for p in quiet.rglob("*") if "tfevents" in p.name),
        "quiet_done": (quiet / "quiet_stage" / "losses.jsonl").is_file(),
    }


@pytest.mark.timeout(400)
def test_train_section_keys_shape_the_stage_run(spawn, tmp_path):
    """One stage of 12 steps with every train.* key away from its default, then one with train.tensorboard=false."""
    data = small_synth_shards(tmp_path / "synth")
    (got,) = spawn(f"{TARGET}:worker_train_keys", 1, {"root": str(tmp_path), **data}, timeout_s=380,
                   init="deepspeed")
    assert got["stage_dir"]  # stages.N.name: the stage's folder under run.output_dir
    # train.log_every=3: TensorBoard scalars at every 3rd step (and the last)
    assert got["loss_steps"] == [3, 6, 9, 12], got
    # train.save_every=5 saves steps 5, 10 and the last; train.keep_last=2 keeps the newest two
    assert got["checkpoints"] == [10, 12], got
    # train.gradient_accumulation_steps=2: the engine's micro-steps per step; 2 x 4 samples per step
    assert got["gradient_accumulation_steps"] == 2 and got["samples_seen"] == STEPS * 2 * 4, got
    assert got["checkpointing_modules"] > 0, got  # train.activation_checkpointing
    # train.spike_factor=0.5: every loss is above half the median: flagged from the first step after the
    # detector's 10-step warm-up
    assert got["spike_steps"] == [11, 12], got
    # train.router_alarm_max_over_mean=1.0: any imbalance at all raises the alarm, at every logged step
    assert got["alarms"] and all(v > 0 for v in got["alarms"]), got
    # train.tensorboard=false: the stage trains and logs its losses, but writes no event file
    assert got["quiet_done"] and got["quiet_files"] == [], got


def worker_optimizer_keys(rank: int, world: int, args: dict) -> dict:
    from omni_moe.training.pipeline import build_stage, train_built_stage

    results = {}
    for name, grad_clip in (("clipped", "0.5"), ("unclipped", "null")):
        recipe = _recipe(args, Path(args["root"]) / name, "train.tensorboard=false", (
            # + attention: a dense 2-D weight, so the stage has a weight-decay group to read weight_decay from
            f"stages=[{{name: {name}, train: [intra_experts, routers, attention], steps: 1, "
            f"optimizer: {{lr: 2.0e-3, betas: [0.8, 0.9], "
            f"eps: 1.0e-6, weight_decay: 0.03, grad_clip: {grad_clip}, router_lr_scale: 3.0, warmup_steps: 0, "
            "schedule: constant}}]"))
        result = train_built_stage(recipe, 0, build_stage(recipe, 0))
        groups = {g.get("name", str(i)): {k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items()
                                          if k in ("lr", "betas", "eps", "weight_decay")}
                  for i, g in enumerate(result.setup.optimizer.param_groups)}
        results[name] = {"groups": groups, "clip": result.setup.engine.gradient_clipping()}
    return results


@pytest.mark.timeout(300)
def test_stage_optimizer_keys_reach_the_engine(spawn, tmp_path):
    """lr, betas, eps, weight_decay, grad_clip (null: off) and router_lr_scale of a stage's optimizer section, read
    back from the DeepSpeed engine after one step (a constant schedule without warmup: the lr is the recipe's)."""
    data = small_synth_shards(tmp_path / "synth")
    (got,) = spawn(f"{TARGET}:worker_optimizer_keys", 1, {"root": str(tmp_path), **data}, timeout_s=280,
                   init="deepspeed")
    groups = got["clipped"]["groups"]
    routers = [g for name, g in groups.items() if name.startswith("routers")]
    others = [g for name, g in groups.items() if not name.startswith("routers")]
    assert routers and others, groups
    assert all(g["lr"] == pytest.approx(2.0e-3) for g in others), groups
    assert all(g["lr"] == pytest.approx(3 * 2.0e-3) for g in routers), groups  # router_lr_scale
    assert all(g["betas"] == pytest.approx([0.8, 0.9]) and g["eps"] == pytest.approx(1.0e-6) for g in groups.values())
    decay = [g["weight_decay"] for name, g in groups.items() if name.startswith("decay")]
    assert decay and all(w == pytest.approx(0.03) for w in decay), groups
    assert got["clipped"]["clip"] == pytest.approx(0.5)
    assert not got["unclipped"]["clip"], got["unclipped"]  # grad_clip: null turns clipping off


def worker_waits_for_a_missing_peer(rank: int, world: int, args: dict) -> dict:
    from omni_moe.training.distributed import init_distributed
    from omni_moe.training.pipeline import run_training

    recipe = _recipe(args, Path(args["root"]) / "run", f"train.timeout_s={args['timeout_s']}",
                     "run.nproc_per_node=2")
    if rank == 1:  # joins the group, then never takes part in a collective
        init_distributed(timeout_s=600)
        time.sleep(600)
    run_training(recipe)
    return {}


@pytest.mark.timeout(300)
def test_timeout_s_is_the_process_group_timeout(spawn, tmp_path):
    """train.timeout_s bounds every collective of the run: with a peer that never joins rank 0's first collective
    (the output folder's run id broadcast), rank 0 fails after timeout_s -- 10 s here, not the 30-minute default --
    and gloo's error states the timeout in force."""
    data = small_synth_shards(tmp_path / "synth")
    with pytest.raises(Exception) as info:  # conftest's WorkerError (pytest loads conftest under its own name)
        spawn(f"{TARGET}:worker_waits_for_a_missing_peer", 2, {"root": str(tmp_path), "timeout_s": 10, **data},
              timeout_s=240, init="none")
    report = str(info.value)
    assert type(info.value).__name__ == "WorkerError", report  # not WorkerTimeout: the run did not hang
    assert "--- rank 0: exit code 1 ---" in report and "Timed out waiting 10000ms" in report, report


SCHEDULE_RUNS = {  # name -> (schedule, warmup_steps); 8 steps each, min_lr_ratio 0.25, lr 1e-3
    "cosine": ("cosine", 3), "linear": ("linear", 3), "constant": ("constant", 3), "no_warmup": ("constant", 0)}


def worker_lr_schedules(rank: int, world: int, args: dict) -> dict:
    from omni_moe.training.pipeline import build_stage, train_built_stage

    curves = {}
    for name, (schedule, warmup) in SCHEDULE_RUNS.items():
        output = Path(args["root"]) / name
        recipe = _recipe(args, output, "train.log_every=1", (
            f"stages=[{{name: {name}, preset: modality_experts, steps: 8, optimizer: {{lr: 1.0e-3, "
            f"schedule: {schedule}, warmup_steps: {warmup}, min_lr_ratio: 0.25}}}}]"))
        train_built_stage(recipe, 0, build_stage(recipe, 0))
        curves[name] = [v for _, v in _scalars(output / name / "tensorboard")["train/lr"]]
    return curves


@pytest.mark.timeout(400)
def test_lr_schedule_keys_shape_train_lr(spawn, tmp_path):
    """optimizer.schedule / warmup_steps / min_lr_ratio seen where a user sees them: TensorBoard's train/lr, one
    value a step. (The curve's exact values are training/lr_schedule.py's, tested on its own; here, that the recipe's
    keys reach it. The assertions hold whether a step logs its own lr or the next step's.)"""
    data = small_synth_shards(tmp_path / "synth")
    (curves,) = spawn(f"{TARGET}:worker_lr_schedules", 1, {"root": str(tmp_path), **data}, timeout_s=380,
                      init="deepspeed")
    lr, floor = 1.0e-3, 0.25e-3
    assert all(len(c) == 8 for c in curves.values()), curves
    for name in ("cosine", "linear", "constant"):  # warmup_steps=3: the first step below the full lr, then lr
        assert 0 < curves[name][0] < lr and max(curves[name]) == pytest.approx(lr), (name, curves[name])
    assert curves["no_warmup"] == pytest.approx([lr] * 8), curves  # warmup_steps=0, constant: lr throughout
    assert curves["constant"][-4:] == pytest.approx([lr] * 4), curves
    for name in ("cosine", "linear"):  # min_lr_ratio=0.25: the decay ends at a quarter of lr
        assert curves[name][-1] == pytest.approx(floor), (name, curves[name])
        decay = curves[name][curves[name].index(max(curves[name])):]
        assert all(a >= b for a, b in zip(decay, decay[1:])), (name, decay)
    # schedule: between the same end points, cosine is above the straight line early in the decay, below it late
    cosine, linear = (curves[n][curves[n].index(max(curves[n])):] for n in ("cosine", "linear"))
    assert cosine[1] > linear[1] * 1.01, curves
    assert any(c < l * 0.99 for c, l in zip(cosine, linear)), curves
