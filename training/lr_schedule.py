"""The learning-rate schedule of a stage: linear warmup, then cosine or linear decay to `min_lr_ratio x lr` at the
stage's last step, or a constant lr after the warmup.

Steps are counted from 0: `lr_factor(i, ...)` is the factor of the (i+1)-th optimizer step. Warmup over W steps runs
steps 0..W-1 at lr x 1/W, 2/W, ..., 1, so the first step already trains (DeepSpeed's own schedulers start at
iteration -1 and waste the first step at lr 0); W = 0 and W = 1 both start at the full lr. The decay runs from the
warmup's last step (factor 1; step 0 without warmup) to the stage's last step, `total_steps - 1`, which runs at
exactly `min_lr_ratio x lr`. A stage whose warmup covers every step has nothing to decay over; a warmup longer than
the stage (`stages.0.steps=10` on the command line with a 50-step warmup) is cut by the stage's end, so its lr
never reaches the full value.

`StageLRScheduler` applies the factor to every optimizer group's own base lr (router groups with their scaled lr
keep their ratio to the rest). Its state is the position only (`last_epoch` = optimizer steps applied so far), so
a resumed run continues the curve of the recipe it is resumed with.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler

SCHEDULES = ("cosine", "linear", "constant")


def check_schedule(schedule: str, warmup_steps: int, total_steps: int, min_lr_ratio: float) -> None:
    """Raise ValueError naming the setting unless the schedule is well defined."""
    if schedule not in SCHEDULES:
        raise ValueError(f"lr schedule must be one of {SCHEDULES}, got {schedule!r}")
    if not (isinstance(total_steps, int) and total_steps >= 1):
        raise ValueError(f"lr schedule: total_steps must be a positive integer, got {total_steps!r}")
    if not (isinstance(warmup_steps, int) and warmup_steps >= 0):
        raise ValueError(f"lr schedule: warmup_steps must be a non-negative integer, got {warmup_steps!r}")
    if not 0.0 <= min_lr_ratio <= 1.0:
        raise ValueError(f"lr schedule: min_lr_ratio must be in [0, 1], got {min_lr_ratio!r}")


def lr_factor(step: int, schedule: str, warmup_steps: int, total_steps: int, min_lr_ratio: float) -> float:
    """The lr multiplier of optimizer step `step` (0-based). Steps past the last keep the last step's factor."""
    check_schedule(schedule, warmup_steps, total_steps, min_lr_ratio)
    if step < 0:
        raise ValueError(f"lr schedule: step must be >= 0, got {step}")
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    peak, last = max(warmup_steps, 1) - 1, total_steps - 1
    if last <= peak:
        return 1.0
    progress = min(step - peak, last - peak) / (last - peak)
    decayed = progress if schedule == "linear" else 0.5 * (1.0 - math.cos(math.pi * progress))
    # interpolated this way so that progress 0 gives exactly 1 and progress 1 exactly min_lr_ratio
    return (1.0 - decayed) + min_lr_ratio * decayed


@dataclass(frozen=True)
class LRSchedule:
    """A stage's schedule settings (validated on construction)."""

    schedule: str = "cosine"
    warmup_steps: int = 0
    total_steps: int = 1
    min_lr_ratio: float = 0.1

    def __post_init__(self) -> None:
        check_schedule(self.schedule, self.warmup_steps, self.total_steps, self.min_lr_ratio)

    def factor(self, step: int) -> float:
        return lr_factor(step, self.schedule, self.warmup_steps, self.total_steps, self.min_lr_ratio)


class StageLRScheduler(LRScheduler):
    """A torch LR scheduler following `LRSchedule`: group g's lr at step i is `base_lr_g x schedule.factor(i)`.

    Built over the optimizer's groups after their lrs are set (DeepSpeed calls the factory `initialize_engine`
    passes with its basic optimizer); `step()` after every applied optimizer step (DeepSpeed does it, and not for a
    skipped one)."""

    def __init__(self, optimizer: Optimizer, schedule: LRSchedule):
        self.schedule = schedule
        super().__init__(optimizer)

    def get_lr(self) -> list[float]:
        factor = self.schedule.factor(self.last_epoch)
        return [float(base) * factor for base in self.base_lrs]

    def state_dict(self) -> dict[str, Any]:
        """The position only (JSON-able): the schedule and base lrs come from the run's settings."""
        return {"last_epoch": self.last_epoch}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the position and set every group's lr for it at once (not only at the next `step()`)."""
        last_epoch = state_dict.get("last_epoch")
        if not (isinstance(last_epoch, int) and last_epoch >= 0):
            raise ValueError(f"StageLRScheduler state: 'last_epoch' must be an integer >= 0, got {state_dict!r}")
        self.last_epoch = last_epoch
        self._step_count = last_epoch + 1
        values = self.get_lr()
        for group, lr in zip(self.optimizer.param_groups, values, strict=True):
            group["lr"] = lr
        self._last_lr = list(values)


__all__ = ["SCHEDULES", "LRSchedule", "StageLRScheduler", "check_schedule", "lr_factor"]
