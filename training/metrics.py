"""Training metrics: router health, loss-spike detection, and the TensorBoard / wandb writer.

Router health looks at each pool of experts on its own: an intra pool only ever sees its modality's tokens and the
inter pool sees everyone's, so their loads are not comparable; within a pool, a balanced router spreads load evenly.
An expert that gets no tokens over a window although its pool got plenty is *dead*; a pool whose busiest expert
carries more than `max_over_mean` times the pool's mean load is *collapsed*. Either raises the alarm.
"""

from __future__ import annotations

import logging
import math
from collections import deque
from dataclasses import dataclass, field
from statistics import median
from typing import Any

import torch

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- router health
@dataclass
class PoolHealth:
    layer: int
    pool: str
    tokens: float
    dead: list[int]  # global expert ids
    max_over_mean: float
    size: int


@dataclass
class RouterReport:
    pools: list[PoolHealth] = field(default_factory=list)
    null_fraction: float = 0.0

    @property
    def dead_experts(self) -> int:
        return sum(len(p.dead) for p in self.pools)

    @property
    def worst_max_over_mean(self) -> float:
        return max((p.max_over_mean for p in self.pools), default=0.0)

    def alarms(self, max_over_mean: float) -> list[str]:
        out = []
        for p in self.pools:
            if p.dead:
                out.append(f"layer {p.layer} {p.pool} pool: dead experts {p.dead} ({p.tokens:.0f} tokens routed to the pool)")
            limit = collapse_threshold(p.size, max_over_mean)
            if p.max_over_mean > limit:
                out.append(f"layer {p.layer} {p.pool} pool: max/mean load {p.max_over_mean:.2f} > {limit:.2f}")
        return out


def collapse_threshold(pool_size: int, max_over_mean: float) -> float:
    """A pool of n experts cannot exceed max/mean = n (one expert takes all), so small pools get a lower bar:
    3/4 of the way from balanced (1) to fully collapsed (n)."""
    return min(max_over_mean, 1.0 + 0.75 * (pool_size - 1))


class RouterHealth:
    """Accumulates `tokens_per_expert [M, C]` of every MoE layer over a window of steps and judges each pool."""

    def __init__(self, config, min_tokens_per_expert: float = 64.0, max_over_mean: float = 4.0):
        self.pools = {k: list(v) for k, v in config.expert_pools().items() if k != "null" and len(v)}
        self.modalities = list(config.modalities)
        self.min_tokens_per_expert = min_tokens_per_expert
        self.max_over_mean = max_over_mean
        self.loads: list[torch.Tensor] | None = None
        self.null_slots = 0.0
        self.all_slots = 0.0

    def update(self, router_outputs) -> None:
        """Add a micro-batch's loads. Stays on the loads' device (no host sync per step: `report` copies once)."""
        loads = [r.tokens_per_expert.detach().float() for r in router_outputs]
        if self.loads is None:
            self.loads = loads
        else:
            self.loads = [a + b for a, b in zip(self.loads, loads)]
        for r, load in zip(router_outputs, loads):
            slots = load.sum()
            self.all_slots = self.all_slots + slots
            self.null_slots = self.null_slots + r.null_fraction.detach().float() * slots

    def report(self, reset: bool = True) -> RouterReport:
        all_slots, null_slots = float(self.all_slots), float(self.null_slots)
        report = RouterReport(null_fraction=null_slots / all_slots if all_slots else 0.0)
        for layer, load in enumerate(self.loads or []):
            load = load.cpu()
            for pool, ids in self.pools.items():
                # an intra pool is judged on its own modality's tokens, the inter pool on everyone's
                rows = [self.modalities.index(pool)] if pool in self.modalities else list(range(len(self.modalities)))
                pool_load = load[rows][:, ids].sum(0)
                tokens = float(pool_load.sum())
                if tokens < self.min_tokens_per_expert * len(ids):
                    continue  # too little traffic to judge
                mean = tokens / len(ids)
                dead = [ids[i] for i, v in enumerate(pool_load.tolist()) if v == 0]
                report.pools.append(PoolHealth(layer, pool, tokens, dead, float(pool_load.max()) / mean, len(ids)))
        if reset:
            self.loads, self.null_slots, self.all_slots = None, 0.0, 0.0
        return report


# ----------------------------------------------------------------------------- loss spikes
class LossSpikeDetector:
    """Flags a loss more than `factor` x the median of the last `window` losses (after `warmup` steps).

    The median (not the mean) keeps one earlier spike from hiding the next, and a ratio threshold adapts as the loss
    falls. Non-finite losses are the non-finite guard's business and are not fed here.
    """

    def __init__(self, factor: float = 5.0, window: int = 50, warmup: int = 10):
        self.factor, self.warmup = factor, warmup
        self.history: deque[float] = deque(maxlen=window)

    def update(self, loss: float) -> bool:
        spike = len(self.history) >= self.warmup and loss > self.factor * median(self.history)
        if not spike:
            self.history.append(loss)  # a spike is not allowed to raise the baseline
        return spike

    def state_dict(self) -> dict[str, Any]:
        return {"history": list(self.history)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.history.clear()
        self.history.extend(state["history"])


# ----------------------------------------------------------------------------- writers
class MetricsWriter:
    """TensorBoard scalars (and wandb when asked) from rank 0 only; other ranks get a no-op writer."""

    def __init__(self, log_dir: str | None, enabled: bool = True, wandb_project: str | None = None, run_config=None):
        self.tb = None
        self.wandb = None
        if not enabled or log_dir is None:
            return
        from torch.utils.tensorboard import SummaryWriter

        self.tb = SummaryWriter(log_dir=log_dir)
        if wandb_project:
            import wandb  # optional dependency: pip install omni-moe[wandb]

            self.wandb = wandb.init(project=wandb_project, config=run_config or {}, dir=log_dir)

    def scalars(self, values: dict[str, float], step: int) -> None:
        clean = {k: float(v) for k, v in values.items() if v is not None and math.isfinite(float(v))}
        if self.tb is not None:
            for key, value in clean.items():
                self.tb.add_scalar(key, value, step)
        if self.wandb is not None:
            self.wandb.log(clean, step=step)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.flush()
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()


def router_scalars(router_outputs, modalities: list[str]) -> dict[str, float]:
    """Per-layer, per-modality share of routed slots going to each pool, plus null fraction and aux losses."""
    out: dict[str, float] = {}
    for layer, r in enumerate(router_outputs):
        load = r.tokens_per_expert.detach().float().cpu()
        out[f"router/layer{layer}/null_fraction"] = float(r.null_fraction)
        out[f"router/layer{layer}/aux_loss"] = float(r.aux_loss)
        out[f"router/layer{layer}/z_loss"] = float(r.z_loss)
        for m, name in enumerate(modalities):
            total = float(load[m].sum())
            if total:
                out[f"router/layer{layer}/{name}/max_expert_share"] = float(load[m].max()) / total
    return out
