"""The training loop: one stage, start to finish, on every rank, on a model `parallelize` prepared.

    resume   from the stage's latest *valid* checkpoint (model, optimizer, scheduler, step, RNG, data position)
    loop     micro-batches moved to the engine's device (media in the compute dtype) -> the stage kind's forward
             -> guarded backward/step (non-finite loss or gradient on any rank: every rank skips, counted,
             DeepSpeed's own skipped steps included; `max_nonfinite_in_a_row` in a row aborts)
             -> at the logging cadence: losses of the steps since the last log (one all-reduce), progress bar with
             tokens/s, TensorBoard, loss-spike flag, router-health alarm
             -> checkpoint every `save_every` steps
    finish   a last checkpoint; the pipeline (training/pipeline.py) hands the model on. `train.stop_after_steps`
             leaves early (finished=False).

Every rank runs the same code and issues the same collectives in the same order; decisions that could differ per
rank (skip a step, stop) are all-reduced first. An exception on one rank (its forward, its data, a failed save)
ends every rank within seconds with its cause (training/failure_watch.py), not after the collective timeout.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from .checkpoint_store import CheckpointManager
from .distributed import barrier, get_rank, get_world_size
from .engine import DROPPED, SKIPPED, STEPPED, EngineSetup, guarded_backward_step
from .engine_checkpoint import latest_training_checkpoint, load_training_checkpoint, save_training_checkpoint
from .failure_watch import PeerFailureWatch
from .metrics import LossSpikeDetector, MetricsWriter, RouterHealth, router_scalars
from .parallelize import Parallelized
from .rank_agreement import comm_device
from .recipe import TrainSection
from .resume_config import check_resume_config
from .lora import unwrap_model
from .stage_spec import StageSpec
from .training_state import TrainingState

log = logging.getLogger(__name__)


class NonFiniteAbort(RuntimeError):
    raised_on_every_rank = True  # the skip decision is all-reduced: every rank aborts at the same step


@dataclass
class StageResult:
    setup: EngineSetup
    model: torch.nn.Module
    state: TrainingState
    losses: list[float]  # mean loss over ranks of each step run in this call
    finished: bool = True  # False: left early (stop_after_steps); the stage's last checkpoint has the position


def model_loss(engine: Any, inputs: dict[str, torch.Tensor]):
    """The default stage kind's forward: the model's own loss (next-token cross-entropy + router losses).
    run_every_tower: the same autograd graph on every rank whatever media its batch holds, so ZeRO-2 reduces
    gradient buckets in the same order everywhere."""
    return engine(**inputs, run_every_tower=True)


def to_device(inputs: dict[str, torch.Tensor], device: torch.device, media_dtype: torch.dtype) -> dict:
    """Every tensor of a batch on the engine's device; floating ones (pixels, video frames, audio features) in the
    compute dtype. Integer tensors (ids, masks, labels, modality ids, positions, counts) keep their dtype.
    non_blocking: from pinned host memory the copy overlaps the previous step's work."""
    return {k: v.to(device, dtype=media_dtype if v.is_floating_point() else None, non_blocking=True)
            for k, v in inputs.items()}


def train_stage(
    parallelized: Parallelized,
    stage: StageSpec,
    train: TrainSection,
    loader: Any,
    *,
    stage_dir: Path,
    run_id: str = "",
    media_dtype: torch.dtype = torch.float32,
    forward: Callable[[Any, dict], Any] = model_loss,
) -> StageResult:
    """Train the parallelized model (training/parallelize.py) for `stage.steps` optimizer steps on batches from
    `loader` (a `ResumableLoader`); `forward(engine, inputs)` returns an output with `.loss` (the stage kind's).
    An exception on any rank ends every rank within seconds, naming it (training/failure_watch.py)."""
    with PeerFailureWatch():
        return _train_stage(parallelized, stage, train, loader, stage_dir, run_id, media_dtype, forward)


def _train_stage(parallelized: Parallelized, stage: StageSpec, train: TrainSection, loader: Any, stage_dir: Path,
                 run_id: str, media_dtype: torch.dtype, forward) -> StageResult:
    rank, world = get_rank(), get_world_size()
    setup, model = parallelized.setup, parallelized.model
    engine = setup.engine
    device = torch.device(engine.device)
    config = model.config
    manager = CheckpointManager(stage_dir / "checkpoints", keep_last=train.keep_last, rank=rank, world_size=world,
                                barrier=barrier if dist.is_initialized() else None, run_id=run_id)
    state = TrainingState(step=0, stage=stage.name)
    if rank == 0:
        stage_dir.mkdir(parents=True, exist_ok=True)
    latest = latest_training_checkpoint(manager)
    if latest is not None:
        check_resume_config(latest, model, tuple(train.resume_allow_config_changes))
        state = load_training_checkpoint(latest, setup, model)
        if state.data_state:
            loader.load_state_dict(state.data_state)
        log.warning("stage %s: resumed from %s at step %d", stage.name, latest, state.step)

    writer = MetricsWriter(str(stage_dir / "tensorboard"), enabled=rank == 0 and train.tensorboard)
    spikes = LossSpikeDetector(factor=train.spike_factor)
    if "loss_history" in state.extra:
        spikes.load_state_dict(state.extra["loss_history"])
    step_losses_log = StepLosses(stage_dir / "losses.jsonl", spikes, writer, stage.name, rank)
    health = RouterHealth(config, max_over_mean=train.router_alarm_max_over_mean)
    batches = _endless(loader)
    bar = tqdm(total=stage.steps, initial=state.step, desc=stage.name, disable=rank != 0, dynamic_ncols=True)
    trainable = [p for p in model.parameters() if p.requires_grad]
    nonfinite_in_a_row = 0
    alarmed: set[str] = set()  # pools already warned about this stage
    steps_this_call = 0
    window_tokens, window_start = 0, time.perf_counter()
    step_loads = None  # [layers, modalities, columns] slots of this step's micro-batches (aux-free bias)
    model.train()
    while state.step < stage.steps:
        if train.stop_after_steps is not None and steps_this_call >= train.stop_after_steps:
            bar.close()
            writer.close()
            return StageResult(setup=setup, model=model, state=state, losses=step_losses_log.losses, finished=False)
        micro_losses = []
        while len(micro_losses) < train.gradient_accumulation_steps:
            batch = next(batches)  # an OmniBatch: model inputs + counts for logging
            out = forward(engine, to_device(batch.inputs, device, media_dtype))
            outcome = guarded_backward_step(engine, out.loss + _touch(trainable))
            if outcome in (DROPPED, SKIPPED):
                # DROPPED: every rank dropped this micro-batch (non-finite loss). SKIPPED: the loss was finite but
                # a gradient was not, and the optimizer skipped the step on every rank (DeepSpeed's skipped_steps):
                # the window's gradients are gone, so it starts again. Either way parameters are unchanged.
                state.nonfinite_skips += 1
                nonfinite_in_a_row += 1
                what = "loss" if outcome == DROPPED else "gradients (finite loss; the optimizer skipped the step)"
                log.warning("stage %s step %d: non-finite %s on some rank; every rank skipped it", stage.name,
                            state.step + 1, what)
                if nonfinite_in_a_row >= train.max_nonfinite_in_a_row:
                    raise NonFiniteAbort(
                        f"stage {stage.name}: {nonfinite_in_a_row} non-finite steps or micro-batches in a row, the "
                        f"last at step {state.step + 1} (non-finite {what}); aborting (raise "
                        "train.max_nonfinite_in_a_row to tolerate more)")
                if outcome == SKIPPED:
                    micro_losses, step_loads = [], None
                continue
            if outcome == STEPPED:  # an update was applied: the run of non-finite ones is over
                nonfinite_in_a_row = 0
            tokens = batch.num_tokens
            micro_losses.append(out.loss.detach().float())
            window_tokens += tokens
            state.samples_seen += batch.num_samples
            state.tokens_seen += tokens
            health.update(out.router_outputs or [])
            if config.aux_free_bias and out.router_outputs:
                loads = torch.stack([r.tokens_per_expert for r in out.router_outputs]).detach()
                step_loads = loads if step_loads is None else step_loads + loads
        state.step += 1
        if step_loads is not None:
            _update_aux_free_biases(model, step_loads)
            step_loads = None
        steps_this_call += 1
        step_losses_log.add(state.step, torch.stack(micro_losses).mean())  # stays on the device until a flush
        stopping = train.stop_after_steps is not None and steps_this_call >= train.stop_after_steps
        saving = state.step % train.save_every == 0 or state.step == stage.steps or stopping
        if state.step % train.log_every == 0 or state.step == stage.steps or saving:
            loss = step_losses_log.flush()  # one all-reduce and one host copy for every step since the last flush
        if state.step % train.log_every == 0 or state.step == stage.steps:
            elapsed = max(time.perf_counter() - window_start, 1e-9)
            tokens_per_s = window_tokens * world / elapsed
            report = health.report()
            alarms = report.alarms(train.router_alarm_max_over_mean) if rank == 0 else []
            for alarm in alarms:
                where = alarm.split(":")[0]  # "layer L POOL pool": warn once per pool and stage, count every time
                if where not in alarmed:
                    alarmed.add(where)
                    log.warning("stage %s step %d: router health (rank 0's tokens): %s (further alarms for this "
                                "pool: TensorBoard router/alarms)", stage.name, state.step, alarm)
            scalars = {
                "train/loss": loss, "train/ce_loss": _item(out.ce_loss), "train/aux_loss": _item(out.aux_loss),
                "train/z_loss": _item(out.z_loss), "train/lr": engine.get_lr()[0],
                "train/grad_norm": _item(engine.get_global_grad_norm()), "train/tokens_per_s": tokens_per_s,
                "router/dead_experts": report.dead_experts, "router/max_over_mean": report.worst_max_over_mean,
                "router/null_fraction": report.null_fraction, "router/alarms": len(alarms),
                "train/nonfinite_skips": state.nonfinite_skips,
                **router_scalars(out.router_outputs or [], list(config.modalities)),
                **loader.counters.as_metrics(),
            }
            writer.scalars(scalars, state.step)
            bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{tokens_per_s:,.0f}")
            window_tokens, window_start = 0, time.perf_counter()
        bar.update(1)
        if saving:
            state.extra["loss_history"] = spikes.state_dict()
            save_training_checkpoint(manager, setup, model, state, data_state=loader.state_dict())
    bar.close()
    writer.close()
    return StageResult(setup=setup, model=model, state=state, losses=step_losses_log.losses)


class StepLosses:
    """Each step's loss, mean over ranks: kept on the device and all-reduced in one go at the logging cadence (a
    float() per step would be a host sync per step). A flush appends every pending step to losses.jsonl (rank 0; a
    resumed run appends the steps it repeats) and runs the loss-spike detector over them in order."""

    def __init__(self, path: Path, spikes: LossSpikeDetector, writer: MetricsWriter, stage_name: str, rank: int):
        self.path, self.spikes, self.writer, self.stage_name, self.rank = path, spikes, writer, stage_name, rank
        self.pending: list[tuple[int, torch.Tensor]] = []
        self.losses: list[float] = []

    def add(self, step: int, loss: torch.Tensor) -> None:
        self.pending.append((step, loss.detach().float().reshape(())))

    def flush(self) -> float:
        """Collective. Returns the last step's loss."""
        values = torch.stack([loss for _, loss in self.pending])
        if dist.is_initialized():
            values = values.to(comm_device())
            dist.all_reduce(values)
            values /= dist.get_world_size()
        steps = [step for step, _ in self.pending]
        self.pending = []
        lines = []
        for step, loss in zip(steps, values.tolist()):
            self.losses.append(loss)
            lines.append(json.dumps({"step": step, "loss": loss}) + "\n")
            if self.spikes.update(loss):
                log.warning("stage %s step %d: loss spike %.4f (> %.0fx the recent median)", self.stage_name, step,
                            loss, self.spikes.factor)
                self.writer.scalars({"train/loss_spike": 1.0}, step)
        if self.rank == 0:
            with open(self.path, "a", encoding="utf-8") as handle:
                handle.writelines(lines)
        return self.losses[-1]


def _touch(params: list[torch.Tensor]) -> torch.Tensor:
    """0 x one element of every trainable parameter. A rank whose micro-batch has no image (or no audio) never uses
    the vision (audio) tower, so those parameters would get no gradient there while another rank's do, and the
    ranks' gradient reductions would differ in size (a gloo size mismatch). With this term every rank reduces the
    same parameters; unused ones get exact zeros."""
    return torch.stack([p.reshape(-1)[0] for p in params]).sum() * 0.0


def _endless(loader: Iterable):
    """Batches across epoch boundaries (the loader's own state tracks the epoch). One empty epoch is normal: a
    position saved right after an epoch's last batch resumes into an epoch with nothing left. Two in a row mean
    the data yields no batch at all."""
    empty_epochs = 0
    while True:
        empty_epochs += 1
        for batch in loader:
            empty_epochs = 0
            yield batch
        if empty_epochs >= 2:
            raise RuntimeError("the data loader produced no batch in two epochs in a row (no data for this rank, "
                               "or every sample dropped: see the data/ drop counters)")


def _update_aux_free_biases(model: torch.nn.Module, loads: torch.Tensor) -> None:
    """DeepSeek-V3's aux-loss-free balancing after an optimizer step: each MoE layer's selection bias moves toward
    its underloaded experts. Loads are summed over every rank first, so the (replicated, non-trained) bias buffers
    stay identical on all ranks."""
    loads = loads.double()
    if dist.is_initialized():
        dist.all_reduce(loads)
    for block, layer_loads in zip(unwrap_model(model).moe_blocks, loads, strict=True):
        block.update_aux_free_bias(layer_loads)


def _item(value: Any) -> float | None:
    if value is None:
        return None
    value = float(value.detach() if isinstance(value, torch.Tensor) else value)
    return value if math.isfinite(value) else None
