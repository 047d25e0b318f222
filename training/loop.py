"""The training loop: one stage, start to finish, on every rank.

    setup    shard experts (EP) -> LoRA (if the stage asks) -> freeze per the stage -> optimizer groups -> DeepSpeed
    resume   from the stage's latest *valid* checkpoint (model, optimizer, scheduler, step, RNG, data position)
    loop     micro-batches -> forward -> guarded backward/step (non-finite loss or gradient on any rank: every rank
             skips, counted, DeepSpeed's own skipped steps included; `max_nonfinite_in_a_row` in a row aborts)
             -> metrics (progress bar with tokens/s, TensorBoard), loss-spike flag, router-health alarm
             -> checkpoint every `save_every` steps
    finish   a last checkpoint; the caller (omni/train.py) exports the model (experts gathered, LoRA merged) as the
             Hugging Face folder the next stage starts from. `run.stop_after_steps` leaves early (finished=False).

Every rank runs the same code and issues the same collectives in the same order; decisions that could differ per
rank (skip a step, stop) are all-reduced first. An exception on one rank (its forward, its data, a failed save)
ends every rank within seconds with its cause (training/failure_watch.py), not after the collective timeout.
"""

from __future__ import annotations

import json
import logging
import math
import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from .checkpoint import CheckpointManager, TrainingState
from .checkpointing import latest_training_checkpoint, load_training_checkpoint, save_training_checkpoint
from .distributed import get_rank, get_world_size
from .deepspeed_moe import expert_parameters, install_moe_markers, prepare_expert_parallel, tag_expert_parameters
from .engine import (
    DROPPED, SKIPPED, STEPPED, EngineSetup, build_deepspeed_config, enable_activation_checkpointing,
    guarded_backward_step, initialize_engine,
)
from .failure_watch import PeerFailureWatch
from .metrics import LossSpikeDetector, MetricsWriter, RouterHealth, router_scalars
from .resume_config import check_resume_config
from .freeze import apply_stage, prepare_model_for_stage, trainable_param_groups
from .lora import unwrap_model
from .lr_schedule import LRSchedule
from .stage_spec import StageSpec

log = logging.getLogger(__name__)


class NonFiniteAbort(RuntimeError):
    raised_on_every_rank = True  # the skip decision is all-reduced: every rank aborts at the same step


@dataclass
class RunSettings:
    """Run-wide settings (the recipe's `run` / `parallel` / `train` sections)."""

    output_dir: str
    seed: int = 0
    ep_size: int = 1
    zero_stage: int = 1
    precision: str = "fp32"
    gradient_accumulation_steps: int = 1
    gradient_clipping: float = 1.0
    activation_checkpointing: bool = False
    save_every: int = 100
    keep_last: int = 2
    log_every: int = 10
    max_nonfinite_in_a_row: int = 5
    spike_factor: float = 5.0
    router_alarm_max_over_mean: float = 4.0
    timeout_s: float = 1800.0
    stop_after_steps: int | None = None  # leave after this many steps in this call (checkpoint saved)
    tensorboard: bool = True
    run_id: str = ""  # names this run's checkpoint staging folders (training/run_lock.py: one run per output folder)
    resume_allow_config_changes: tuple[str, ...] = ()  # model-config keys a resumed checkpoint may differ in


@dataclass
class StageResult:
    setup: EngineSetup
    model: torch.nn.Module
    state: TrainingState
    losses: list[float]  # mean loss over ranks of each step run in this call
    finished: bool = True  # False: left early (stop_after_steps); the stage's last checkpoint has the position


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def build_engine(model: torch.nn.Module, stage: StageSpec, run: RunSettings, micro_batch_size: int):
    """Shard experts -> LoRA (adapters land on the local experts) -> freeze per the stage -> DeepSpeed.
    Returns (EngineSetup, the model the engine trains, the stage's FreezePlan)."""
    opt = stage.optimizer
    ds_config = build_deepspeed_config(
        micro_batch_size=micro_batch_size, gradient_accumulation_steps=run.gradient_accumulation_steps,
        zero_stage=run.zero_stage, precision=run.precision, gradient_clipping=opt.grad_clip,
        lr=opt.lr, betas=tuple(opt.betas), eps=opt.eps, weight_decay=opt.weight_decay,
    )
    schedule = LRSchedule(schedule=opt.schedule, warmup_steps=opt.warmup_steps, total_steps=stage.steps,
                          min_lr_ratio=opt.min_lr_ratio)
    layout = prepare_expert_parallel(model, run.ep_size, timeout_s=run.timeout_s)
    model = prepare_model_for_stage(model, stage)
    tag_expert_parameters(model, run.ep_size)  # after LoRA: adapters inside the experts are expert parameters too
    install_moe_markers(model, run.ep_size)
    plan = apply_stage(model, stage)
    # LoRA adapters inside the experts are MoE parameters already: no frozen expert tensor needs to stay in the
    # optimizer then (at real scale that state is several GiB per rank)
    trains_inside_experts = any(p.requires_grad for p in expert_parameters(model))
    if not trains_inside_experts and (run.zero_stage in (1, 2) or run.precision == "bf16"):
        _keep_frozen_experts_in_a_moe_group(model, plan)
    groups = trainable_param_groups(model, plan, opt.lr, opt.weight_decay, opt.router_lr_scale)
    if run.activation_checkpointing:
        enable_activation_checkpointing(model)
    setup = initialize_engine(model, ds_config, layout, param_groups=groups, lr_schedule=schedule)
    return setup, model, plan


def _keep_frozen_experts_in_a_moe_group(model: torch.nn.Module, plan) -> None:
    """DeepSpeed's ZeRO-1/2 and bf16 optimizers assert that an MoE model has at least one MoE parameter group, so a
    stage that trains no routed expert (alignment) cannot simply freeze them. Instead the expert tensors stay in the
    optimizer as fully row-masked tensors (stages.py's mechanism): a hook zeroes every row of their gradient and
    their group has weight decay 0, so with a fresh AdamW their update is exactly 0 and they stay bitwise unchanged
    (at the cost of their optimizer state)."""
    from .freeze import MaskedExperts, _grouped_experts, local_global_ids

    names = {id(p): n for n, p in model.named_parameters()}
    for block in unwrap_model(model).moe_blocks:
        experts = _grouped_experts(block)
        ids = tuple(local_global_ids(experts))
        for attr in ("gate_up_proj", "down_proj"):
            param = getattr(experts, attr)
            param.requires_grad_(True)
            plan.handles.append(param.register_hook(torch.zeros_like))
            plan.masked.append(MaskedExperts(names[id(param)], param, ids, ()))


def train_stage(
    model: torch.nn.Module,
    stage: StageSpec,
    run: RunSettings,
    loader: Any,
    micro_batch_size: int,
    on_checkpoint: Callable[[int], None] | None = None,
) -> StageResult:
    """Train `model` for `stage.steps` optimizer steps on batches from `loader` (a `ResumableLoader`). An exception
    on any rank ends every rank within seconds, naming it (training/failure_watch.py)."""
    with PeerFailureWatch():
        return _train_stage(model, stage, run, loader, micro_batch_size, on_checkpoint)


def _train_stage(model, stage: StageSpec, run: RunSettings, loader: Any, micro_batch_size: int,
                 on_checkpoint: Callable[[int], None] | None) -> StageResult:
    rank, world = get_rank(), get_world_size()
    stage_dir = Path(run.output_dir) / stage.name
    setup, model, plan = build_engine(model, stage, run, micro_batch_size)
    engine = setup.engine
    config = model.config
    manager = CheckpointManager(stage_dir / "checkpoints", keep_last=run.keep_last, rank=rank, world_size=world,
                                barrier=_barrier if dist.is_initialized() else None, run_id=run.run_id)
    state = TrainingState(step=0, stage=stage.name)
    if rank == 0:
        stage_dir.mkdir(parents=True, exist_ok=True)
    latest = latest_training_checkpoint(manager)
    if latest is not None:
        check_resume_config(latest, model, run.resume_allow_config_changes)
        state = load_training_checkpoint(latest, setup, model)
        if state.data_state:
            loader.load_state_dict(state.data_state)
        log.warning("stage %s: resumed from %s at step %d", stage.name, latest, state.step)

    writer = MetricsWriter(str(stage_dir / "tensorboard"), enabled=rank == 0 and run.tensorboard)
    spikes = LossSpikeDetector(factor=run.spike_factor)
    if "loss_history" in state.extra:
        spikes.load_state_dict(state.extra["loss_history"])
    loss_log = stage_dir / "losses.jsonl"
    health = RouterHealth(config, max_over_mean=run.router_alarm_max_over_mean)
    losses: list[float] = []
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
        if run.stop_after_steps is not None and steps_this_call >= run.stop_after_steps:
            bar.close()
            writer.close()
            return StageResult(setup=setup, model=model, state=state, losses=losses, finished=False)
        step_losses = []
        while len(step_losses) < run.gradient_accumulation_steps:
            batch = next(batches)  # an OmniBatch: model inputs + counts for logging
            # run_every_tower: the same autograd graph on every rank whatever media its batch holds, so ZeRO-2
            # reduces gradient buckets in the same order everywhere
            out = engine(**batch.inputs, run_every_tower=True)
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
                if nonfinite_in_a_row >= run.max_nonfinite_in_a_row:
                    raise NonFiniteAbort(
                        f"stage {stage.name}: {nonfinite_in_a_row} non-finite steps or micro-batches in a row, the "
                        f"last at step {state.step + 1} (non-finite {what}); aborting (raise "
                        "train.max_nonfinite_in_a_row to tolerate more)")
                if outcome == SKIPPED:
                    step_losses, step_loads = [], None
                continue
            if outcome == STEPPED:  # an update was applied: the run of non-finite ones is over
                nonfinite_in_a_row = 0
            tokens = batch.num_tokens
            step_losses.append(out.loss.detach().float())
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
        loss = _mean_over_ranks(torch.stack(step_losses).mean())
        losses.append(loss)
        if rank == 0:  # every step's loss, for plots and tests (a resumed run appends the steps it repeats)
            with open(loss_log, "a", encoding="utf-8") as handle:
                handle.write(json.dumps({"step": state.step, "loss": loss}) + "\n")
        if spikes.update(loss):
            log.warning("stage %s step %d: loss spike %.4f (> %.0fx the recent median)", stage.name, state.step, loss,
                        spikes.factor)
            writer.scalars({"train/loss_spike": 1.0}, state.step)
        if state.step % run.log_every == 0 or state.step == stage.steps:
            elapsed = max(time.perf_counter() - window_start, 1e-9)
            tokens_per_s = window_tokens * world / elapsed
            report = health.report()
            alarms = report.alarms(run.router_alarm_max_over_mean) if rank == 0 else []
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
        stopping = run.stop_after_steps is not None and steps_this_call >= run.stop_after_steps
        if state.step % run.save_every == 0 or state.step == stage.steps or stopping:
            state.extra["loss_history"] = spikes.state_dict()
            save_training_checkpoint(manager, setup, model, state, data_state=loader.state_dict())
            if on_checkpoint is not None:
                on_checkpoint(state.step)
        _test_kill_hook(state.step)
    bar.close()
    writer.close()
    return StageResult(setup=setup, model=model, state=state, losses=losses)


def _touch(params: list[torch.Tensor]) -> torch.Tensor:
    """0 x one element of every trainable parameter. A rank whose micro-batch has no image (or no audio) never uses
    the vision (audio) tower, so those parameters would get no gradient there while another rank's do, and the
    ranks' gradient reductions would differ in size (a gloo size mismatch). With this term every rank reduces the
    same parameters; unused ones get exact zeros."""
    return torch.stack([p.reshape(-1)[0] for p in params]).sum() * 0.0


TEST_KILL_AT_STEP, TEST_KILL_RANK = "OMNI_TEST_KILL_AT_STEP", "OMNI_TEST_KILL_RANK"


def _test_kill_hook(step: int) -> None:
    """TEST HOOK (tests/distributed/test_train_loop.py only; never set these in a real run): with
    OMNI_TEST_KILL_AT_STEP=N and OMNI_TEST_KILL_RANK=R, rank R SIGKILLs itself right after finishing step N (and its
    checkpoint, if one falls on N) -- on torchrun's first attempt only (TORCHELASTIC_RESTART_COUNT 0 or unset), so
    the restarted job runs through. Simulates a node dying mid-stage."""
    at = os.environ.get(TEST_KILL_AT_STEP)
    if at is None or int(at) != step or int(os.environ.get(TEST_KILL_RANK, "0")) != get_rank():
        return
    if int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) == 0:
        log.warning("test hook: rank %d kills itself after step %d", get_rank(), step)
        os.kill(os.getpid(), signal.SIGKILL)


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


def _mean_over_ranks(value: torch.Tensor) -> float:
    value = value.detach().float().reshape(1)
    if dist.is_initialized():
        dist.all_reduce(value)
        value /= dist.get_world_size()
    return float(value)


def _item(value: Any) -> float | None:
    if value is None:
        return None
    value = float(value.detach() if isinstance(value, torch.Tensor) else value)
    return value if math.isfinite(value) else None
