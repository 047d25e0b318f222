"""The stage LR schedule and gradient clipping through a real single-process DeepSpeed engine (gloo, DeepSpeed 0.19.8).

Schedules: the lr DeepSpeed's optimizer groups hold before each step (`engine.get_lr()`, the lr that step runs at)
equals `base lr of the group x lr_factor(step)` for cosine, linear and constant, at ZeRO-1 (DeepSpeed's wrapper
around the torch optimizer), with a router group at 10x the lr; a fresh engine whose scheduler loads the state saved
half-way (JSON, as TrainingState stores it) continues the same curve. Clipping: the gradient norm the torch
optimizer sees at its step, against the model's own gradient norm for the same batch, with clipping off (None) and
at a value far below that norm, at ZeRO-0 (our global-norm clip) and ZeRO-1 (DeepSpeed's).
"""

from __future__ import annotations

import copy
import json

import pytest
import torch

TARGET = "tests.distributed.test_engine_schedule"
SCHEDULE_STEPS, WARMUP, MIN_RATIO, RESUME_AT = 6, 2, 0.2, 3
LR, ROUTER_LR = 1e-3, 1e-2
CLIP = 0.05
PG_TIMEOUT_S = 60.0


def _model(seed: int = 0):
    from omni_moe.modeling.modeling_omni import OmniMoeForCausalLM
    from tests.tiny import tiny_config

    torch.manual_seed(seed)
    return OmniMoeForCausalLM(tiny_config(media=False))


def _batch(step: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(500 + step)
    ids = torch.randint(2, 90, (2, 12), generator=gen)
    modality = torch.randint(0, 4, (2, 1), generator=gen).expand(-1, 12).contiguous()
    return {"input_ids": ids, "labels": ids.clone(), "modality_ids": modality}


def _groups(model) -> list[dict]:
    """Two groups with their own lr, each tagged so the test can tell them apart after DeepSpeed's MoE split."""
    router, rest = [], []
    for name, param in model.named_parameters():
        (router if ".mlp.gate." in name else rest).append(param)
    return [{"name": "rest", "params": rest, "lr": LR, "weight_decay": 0.0, "tag": "rest"},
            {"name": "routers", "params": router, "lr": ROUTER_LR, "weight_decay": 0.0, "tag": "routers"}]


def _engine(model, zero_stage: int, clip: float | None, schedule=None, groups=None):
    from tests.distributed.engine_setup import engine_for
    from omni_moe.training.engine import build_deepspeed_config

    config = build_deepspeed_config(micro_batch_size=2, zero_stage=zero_stage, gradient_clipping=clip, lr=LR)
    return engine_for(model, config, 1, lr_schedule=schedule, param_groups=groups, timeout_s=PG_TIMEOUT_S)


def _lrs_per_step(setup, steps: range) -> list[list[tuple[str, float]]]:
    """Before each step: (tag, lr) of every optimizer group; then one training step."""
    engine, seen = setup.engine, []
    for step in steps:
        seen.append([(g["tag"], g["lr"]) for g in engine.optimizer.param_groups])
        assert engine.get_lr() == [lr for _, lr in seen[-1]]
        engine.backward(engine(**_batch(step)).loss)
        engine.step()
    return seen


def worker_schedules(rank: int, world: int, args: dict) -> dict:
    from omni_moe.training.lr_schedule import LRSchedule

    out = {}
    for name in ("cosine", "linear", "constant"):
        schedule = LRSchedule(name, WARMUP, SCHEDULE_STEPS, MIN_RATIO)
        model = _model()
        setup = _engine(model, 1, 1.0, schedule, _groups(model))
        straight = _lrs_per_step(setup, range(RESUME_AT))
        saved = json.dumps(setup.lr_scheduler.state_dict())
        straight += _lrs_per_step(setup, range(RESUME_AT, SCHEDULE_STEPS))

        model = _model(seed=1)
        resumed = _engine(model, 1, 1.0, schedule, _groups(model))
        resumed.lr_scheduler.load_state_dict(json.loads(saved))
        out[name] = {"straight": straight, "resumed": _lrs_per_step(resumed, range(RESUME_AT, SCHEDULE_STEPS)),
                     "scheduler": type(setup.lr_scheduler).__name__}
    return out


def worker_clipping(rank: int, world: int, args: dict) -> dict:
    out = {}
    for zero_stage in (0, 1):
        for clip in (None, CLIP):
            model = _model()
            reference = copy.deepcopy(model)
            reference(**_batch(0)).loss.backward()
            natural = torch.stack([p.grad.norm() for p in reference.parameters() if p.grad is not None]).norm()

            setup = _engine(model, zero_stage, clip)
            seen = []

            def record(optimizer, *_):  # the gradients the torch optimizer is about to apply (ZeRO 1/2 step one
                grads = [p.grad for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
                seen.append(float(sum(g.float().pow(2).sum() for g in grads)))  # group at a time: sum squares

            setup.engine.basic_optimizer.register_step_pre_hook(record)
            setup.engine.backward(setup.engine(**_batch(0)).loss)
            setup.engine.step()
            reported = setup.engine.get_global_grad_norm()
            out[f"zero{zero_stage}_{clip}"] = {"natural": float(natural), "seen": sum(seen) ** 0.5, "calls": len(seen),
                                               "reported": None if reported is None else float(reported)}
    return out


@pytest.fixture(scope="module")
def schedules(spawn):
    return spawn(f"{TARGET}:worker_schedules", 1, {}, timeout_s=300, pg_timeout_s=PG_TIMEOUT_S, init="deepspeed")[0]


@pytest.mark.parametrize("name", ["cosine", "linear", "constant"])
def test_engine_lr_follows_the_schedule_for_every_group_and_after_resume(schedules, name):
    from omni_moe.training.lr_schedule import lr_factor

    run = schedules[name]
    assert run["scheduler"] == "StageLRScheduler"
    for step, groups in enumerate(run["straight"]):
        factor = lr_factor(step, name, WARMUP, SCHEDULE_STEPS, MIN_RATIO)
        assert {tag for tag, _ in groups} == {"rest", "routers"}
        for tag, lr in groups:
            assert lr == (ROUTER_LR if tag == "routers" else LR) * factor, (step, tag, lr)
    first = dict(run["straight"][0])
    assert first["rest"] == LR / WARMUP > 0  # the first step trains
    last = dict(run["straight"][-1])
    assert last["rest"] == LR * (1.0 if name == "constant" else MIN_RATIO)
    assert run["resumed"] == run["straight"][RESUME_AT:]


def test_grad_clip_none_leaves_gradients_unscaled_and_a_value_clips(spawn):
    results = spawn(f"{TARGET}:worker_clipping", 1, {}, timeout_s=300, pg_timeout_s=PG_TIMEOUT_S,
                    init="deepspeed")[0]
    for zero_stage in (0, 1):
        off, on = results[f"zero{zero_stage}_None"], results[f"zero{zero_stage}_{CLIP}"]
        assert off["natural"] > 20 * CLIP  # far above the threshold: clipping would show
        assert off["calls"] >= 1 and on["calls"] >= 1
        assert off["seen"] == pytest.approx(off["natural"], rel=1e-4), (zero_stage, off)
        assert on["seen"] == pytest.approx(CLIP, rel=1e-3), (zero_stage, on)
        for run in (off, on):  # the reported norm is the norm before clipping
            if run["reported"] is not None:
                assert run["reported"] == pytest.approx(run["natural"], rel=1e-4), (zero_stage, run)
        assert on["reported"] is not None
