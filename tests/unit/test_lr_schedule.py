"""The stage LR schedule as a pure function, and the torch scheduler built from it (a plain torch optimizer; the
DeepSpeed engine path is tests/distributed/test_engine_schedule.py)."""

import json
import math

import pytest
import torch

from omni_moe.training.lr_schedule import LRSchedule, StageLRScheduler, lr_factor

WARMUP, TOTAL, MIN = 4, 14, 0.1  # warmup steps 0..3, decay from step 3 (factor 1) to step 13 (factor MIN)


def curve(schedule: str, warmup: int = WARMUP, total: int = TOTAL, min_ratio: float = MIN) -> list[float]:
    return [lr_factor(i, schedule, warmup, total, min_ratio) for i in range(total)]


@pytest.mark.parametrize("schedule", ["cosine", "linear", "constant"])
def test_warmup_starts_above_zero_and_reaches_the_full_lr_at_its_last_step(schedule):
    factors = curve(schedule)
    assert factors[:WARMUP] == [0.25, 0.5, 0.75, 1.0]  # the first step trains (no step at lr 0)


def test_cosine_values_at_warmup_end_midpoint_and_last_step():
    factors = curve("cosine")
    peak, last = WARMUP - 1, TOTAL - 1
    assert factors[peak] == 1.0 and factors[last] == MIN
    mid = (peak + last) // 2  # progress 0.5: cos(pi/2) = 0 -> halfway between 1 and MIN
    assert factors[mid] == pytest.approx((1 + MIN) / 2, abs=1e-15)
    quarter = peak + (last - peak) * 3 // 10  # progress 0.3
    assert factors[quarter] == pytest.approx(MIN + (1 - MIN) * 0.5 * (1 + math.cos(math.pi * 0.3)), abs=1e-15)
    assert all(a > b for a, b in zip(factors[peak:], factors[peak + 1:]))  # strictly decreasing after the peak


def test_linear_values_at_warmup_end_midpoint_and_last_step():
    factors = curve("linear")
    peak, last = WARMUP - 1, TOTAL - 1
    assert factors[peak] == 1.0 and factors[last] == MIN
    assert factors[(peak + last) // 2] == pytest.approx((1 + MIN) / 2, abs=1e-15)
    steps = [a - b for a, b in zip(factors[peak:], factors[peak + 1:])]
    assert steps == pytest.approx([(1 - MIN) / (last - peak)] * (last - peak), abs=1e-15)  # equal decrements


def test_constant_keeps_the_full_lr_after_warmup():
    assert curve("constant")[WARMUP - 1:] == [1.0] * (TOTAL - WARMUP + 1)
    assert curve("constant", warmup=0) == [1.0] * TOTAL


def test_without_warmup_the_first_step_runs_at_the_full_lr_and_the_last_at_the_minimum():
    for warmup in (0, 1):  # warmup over one step is no warmup
        factors = curve("cosine", warmup=warmup, total=5, min_ratio=0.0)
        assert factors[0] == 1.0 and factors[-1] == 0.0 and factors[2] == pytest.approx(0.5, abs=1e-15)


def test_edges():
    assert curve("cosine", warmup=0, total=1) == [1.0]  # one step: nothing to decay over
    assert curve("linear", warmup=3, total=3) == [1 / 3, 2 / 3, 1.0]  # warmup covers the stage
    assert curve("cosine", warmup=4, total=2) == [0.25, 0.5]  # a warmup longer than the stage is cut by its end
    assert lr_factor(50, "cosine", WARMUP, TOTAL, MIN) == MIN  # past the end: the last step's factor
    assert curve("linear", warmup=0, total=2, min_ratio=0.5) == [1.0, 0.5]


@pytest.mark.parametrize("kwargs, match", [
    ({"schedule": "step"}, "schedule must be one of"),
    ({"warmup_steps": -1}, "warmup_steps"),
    ({"total_steps": 0}, "total_steps"),
    ({"min_lr_ratio": 1.5}, "min_lr_ratio"),
])
def test_bad_settings_name_the_setting(kwargs, match):
    settings = {"schedule": "cosine", "warmup_steps": WARMUP, "total_steps": TOTAL, "min_lr_ratio": MIN, **kwargs}
    with pytest.raises(ValueError, match=match):
        LRSchedule(**settings)
    with pytest.raises(ValueError, match="step must be >= 0"):
        lr_factor(-1, "cosine", WARMUP, TOTAL, MIN)


def _optimizer() -> torch.optim.Optimizer:
    dense, router = torch.nn.Parameter(torch.ones(2)), torch.nn.Parameter(torch.ones(2))
    return torch.optim.AdamW([{"params": [dense], "lr": 1e-3}, {"params": [router], "lr": 1e-2}])


@pytest.mark.parametrize("schedule", ["cosine", "linear", "constant"])
def test_scheduler_scales_every_groups_own_lr_and_resumes_on_the_same_curve(schedule):
    settings = LRSchedule(schedule, WARMUP, TOTAL, MIN)
    optimizer = _optimizer()
    scheduler = StageLRScheduler(optimizer, settings)
    seen, saved = [], None
    for step in range(TOTAL):
        seen.append([g["lr"] for g in optimizer.param_groups])  # the lr optimizer step `step` runs at
        optimizer.step()
        scheduler.step()
        if step == 5:
            saved = json.loads(json.dumps(scheduler.state_dict()))  # as TrainingState stores it
    assert seen == [[1e-3 * f, 1e-2 * f] for f in curve(schedule)]

    resumed_optimizer = _optimizer()
    resumed = StageLRScheduler(resumed_optimizer, settings)
    resumed.load_state_dict(saved)  # the lr of the next step is in the groups at once, not after a step
    again = []
    for _ in range(6, TOTAL):
        again.append([g["lr"] for g in resumed_optimizer.param_groups])
        resumed_optimizer.step()
        resumed.step()
    assert again == seen[6:]
    assert resumed.get_last_lr() == [g["lr"] for g in resumed_optimizer.param_groups]
    with pytest.raises(ValueError, match="last_epoch"):
        resumed.load_state_dict({"last_batch_iteration": 3})  # a DeepSpeed scheduler's state is refused by name
