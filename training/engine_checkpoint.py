"""Training checkpoints through the DeepSpeed engine with expert parallelism: save, resume bit-exactly, reshard.

What one checkpoint folder (published by `CheckpointManager`: staged, checksummed, committed) holds:

    model_dense.safetensors        rank 0: every non-expert tensor of `model.state_dict()` (frozen ones too)
    rank-NNNNN/experts.safetensors the first expert-data-parallel replica of each EP rank: its experts, one tensor
                                   per expert, keyed `<state-dict key>.expert.<GLOBAL id>` (a checkpoint saved at EP=2
                                   loads at EP=1 or EP=4)
    rank-NNNNN/rng.safetensors     every rank: Python / NumPy / torch generator states (training/rng.py)
    rank-NNNNN/training_state.json every rank: TrainingState incl. this rank's data position and the LR scheduler
    training_layout.json           rank 0: world/EP/ZeRO layout, expert file map, engine counters
    model_config.json              rank 0: the model's OmniMoeConfig (stage MoE overrides included), and
    lora/adapter_config.json       with a PEFT adapter, its LoraConfig: the checkpoint describes its own model, so
                                   it loads for inference without the recipe (omni/loading.py)
    deepspeed/                     DeepSpeed's own files: optimizer state (ZeRO partitions incl. the MoE groups'
                                   fp32 master weights and Adam moments), LR scheduler, engine counters

Why DeepSpeed's module state is left empty: our markers are not real `deepspeed.moe.layer.MoE` experts, so
DeepSpeed would write only data-parallel rank 0's module state -- other EP ranks' experts silently lost -- and on
load copy rank 0's (frozen) expert tensors into every rank. Weights therefore live only in our safetensors files;
DeepSpeed's files carry what only DeepSpeed can restore (its optimizer partitions).

Loading (`load_training_checkpoint`, collective): rank 0 verifies the manifest (sha256 of every file) and every
rank raises the same `CheckpointIntegrityError` if anything is off, before any file is read. Then:
  * same layout (world size, EP size, ZeRO stage, precision): DeepSpeed's `load_checkpoint` restores optimizer,
    scheduler and counters -- reading its `torch.save` pickles ONLY with `weights_only=True`
    (training/deepspeed_state.py); our files then fill the module, and ZeRO's fp32 master copy of every parameter
    is checked against the loaded weights (`check_master_weights`);
  * another layout: weights from our files (experts by global id), a FRESH optimizer (DeepSpeed cannot re-partition
    ZeRO state for another data-parallel size without its universal-checkpoint conversion), scheduler position and
    engine counters from our JSON; a warning names everything that was reset.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from .checkpoint_files import load_tensors, read_json, save_tensors, write_json
from .checkpoint_store import CheckpointIntegrityError, CheckpointManager
from .deepspeed_state import (
    MasterWeightMismatchError, check_master_weights, ignore_deepspeed_module_state, module_weights_left_out,
    weights_only_deepspeed_loads,
)
from .engine import EngineSetup
from .expert_parallel import grouped_experts, is_expert_key, moe_blocks
from .failure_watch import raised_on_every_rank
from .rank_agreement import broadcast_json, comm_device, first_failure, raise_if_any_rank_failed
from .rng import load_rng_state, save_rng_state
from .training_state import TrainingState
from .weights_files import SafetensorsFile

logger = logging.getLogger(__name__)

LAYOUT_FILE = "training_layout.json"
DENSE_FILE = "model_dense.safetensors"
EXPERT_FILE = "experts.safetensors"
RNG_FILE = "rng.safetensors"
STATE_FILE = "training_state.json"
DEEPSPEED_TAG = "deepspeed"
EXPERT_SEPARATOR = ".expert."
MODEL_CONFIG_FILE = "model_config.json"
LORA_CONFIG_DIR = "lora"
LAYOUT_FORMAT = "omni-training-checkpoint"
LAYOUT_FORMAT_VERSION = 1
# DeepSpeed drops these into its folder; they would rebuild a model from rank 0's module state only (our experts
# are not there), so a checkpoint never ships them.
_DEEPSPEED_RECOVERY_SCRIPTS = ("zero_to_fp32.py", "zero_to_torch.py")


class CheckpointLayoutError(ValueError):
    """The checkpoint's tensors do not fit the model (missing/unexpected keys, shapes, an unreshardable tensor)."""


# a failure of one rank is raised on every rank as this type when its name matches, else as RuntimeError
_ERROR_TYPES = (CheckpointLayoutError, MasterWeightMismatchError)


def _world() -> tuple[int, int]:
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


# -------------------------------------------------------------------------------------------- which tensors
def _expert_blocks(model: nn.Module) -> list[tuple[str, list[int]]]:
    """(state-dict prefix of the block's `experts`, global expert ids of this rank in local order) per MoE block."""
    names = {id(m): name for name, m in model.named_modules()}
    out = []
    for block in moe_blocks(model):
        experts = grouped_experts(block)
        ids = list(getattr(experts, "global_ids", range(experts.num_experts)))
        out.append((f"{names[id(block)]}.experts.", ids))
    return out


def _split_state(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, tuple[torch.Tensor, list[int]]]]:
    """Split `model.state_dict()` into dense entries and expert entries (key -> (tensor, this rank's global ids)).
    State-dict tensors share storage with the parameters, so copying into them loads the model in place."""
    state = model.state_dict()
    expert_prefixes = _expert_blocks(model)
    dense, experts = {}, {}
    for key, tensor in state.items():
        owner = next((ids for prefix, ids in expert_prefixes if key.startswith(prefix)), None)
        if owner is None:
            dense[key] = tensor
        else:
            experts[key] = (tensor, owner)
    return dense, experts


def _expert_tensors_to_save(experts: dict[str, tuple[torch.Tensor, list[int]]]) -> tuple[dict, list[str]]:
    """Fused expert tensors (dim 0 = local expert) sliced per expert under global ids; anything else inside the
    experts (e.g. LoRA factors, whose layout interleaves experts) is saved whole and can only be loaded at the
    same EP size. Returns (tensors, keys of those EP-bound entries)."""
    out, ep_bound = {}, []
    for key, (tensor, ids) in experts.items():
        if is_expert_key(key):
            if tensor.shape[0] != len(ids):
                raise CheckpointLayoutError(f"{key}: dim 0 is {tensor.shape[0]} but this rank holds {len(ids)} experts")
            for local, global_id in enumerate(ids):
                out[f"{key}{EXPERT_SEPARATOR}{global_id}"] = tensor[local]
        else:
            out[key] = tensor
            ep_bound.append(key)
    return out, ep_bound


# ----------------------------------------------------------------------------------------------- layout
def current_layout(setup: EngineSetup, model: nn.Module) -> dict[str, Any]:
    """This run's parallel layout and engine counters (what decides same-layout resume vs reshard)."""
    engine = setup.engine
    blocks = moe_blocks(model)
    num_experts = getattr(grouped_experts(blocks[0]), "num_global_experts", None) if blocks else None
    return {
        "world_size": _world()[1], "ep_size": setup.layout.ep_size,
        "expert_data_parallel_size": setup.layout.expert_data_parallel_size,
        "zero_stage": int(engine.zero_optimization_stage()), "bf16": bool(engine.bfloat16_enabled()),
        "num_global_experts": num_experts,
        "engine": {"global_steps": int(engine.global_steps), "global_samples": int(engine.global_samples),
                   "skipped_steps": int(engine.skipped_steps)},
    }


def _same_layout(saved: dict[str, Any], now: dict[str, Any]) -> bool:
    return all(saved[k] == now[k] for k in ("world_size", "ep_size", "zero_stage", "bf16"))


# ------------------------------------------------------------------------------------------------ saving
def save_training_checkpoint(manager: CheckpointManager, setup: EngineSetup, model: nn.Module, state: TrainingState,
                             data_state: dict | None = None, metadata: dict | None = None) -> Path:
    """Collective: every rank calls it at an optimizer-step boundary. Returns the published checkpoint folder.

    `state.step` names the folder; `data_state` (this rank's data-loader position, JSON) replaces
    `state.data_state` when given; the LR scheduler's state is stored in the TrainingState too."""
    engine, layout = setup.engine, setup.layout
    rank, world = _world()
    if engine.micro_steps % engine.gradient_accumulation_steps():
        raise RuntimeError(f"save_training_checkpoint: engine is mid gradient accumulation (micro step "
                           f"{engine.micro_steps}, {engine.gradient_accumulation_steps()} per step): save after "
                           "engine.step() completes an optimizer step, or the pending gradients are lost")
    state = dataclasses.replace(
        state, data_state=state.data_state if data_state is None else data_state,
        scheduler_state=setup.lr_scheduler.state_dict() if setup.lr_scheduler is not None else {})
    ckpt = manager.begin(state.step)

    ep_group_rank = dist.get_rank(group=layout.expert_data_parallel_group) if dist.is_initialized() else 0
    writes_experts = ep_group_rank == 0
    # rank -> (EP rank, writes this EP rank's experts?) for the expert file map rank 0 records
    mine = torch.tensor([layout.ep_rank, int(writes_experts)], dtype=torch.int64, device=comm_device())
    everyone = [torch.empty_like(mine) for _ in range(world)]
    if dist.is_initialized():
        dist.all_gather(everyone, mine)
    else:
        everyone = [mine]
    error = None
    try:
        save_rng_state(ckpt.rank_dir / RNG_FILE)
        state.save(ckpt.rank_dir / STATE_FILE)
        with torch.no_grad():
            dense, experts = _split_state(model)
            expert_tensors, ep_bound = _expert_tensors_to_save(experts)
            if writes_experts and expert_tensors:
                save_tensors(ckpt.rank_dir / EXPERT_FILE, expert_tensors,
                             metadata={"ep_rank": layout.ep_rank, "ep_size": layout.ep_size})
            if rank == 0:
                save_tensors(ckpt.path / DENSE_FILE, dense)
                expert_files = {str(int(ep)): f"rank-{r:05d}/{EXPERT_FILE}"
                                for r, (ep, writer) in enumerate(t.tolist() for t in everyone) if writer}
                write_json(ckpt.path / LAYOUT_FILE, {
                    "format": LAYOUT_FORMAT, "format_version": LAYOUT_FORMAT_VERSION, "step": state.step,
                    **current_layout(setup, model), "gradient_accumulation_steps": engine.gradient_accumulation_steps(),
                    "dense_file": DENSE_FILE, "expert_files": expert_files if experts else {},
                    "ep_bound_keys": sorted(ep_bound), "deepspeed_tag": DEEPSPEED_TAG,
                    **_write_model_description(ckpt.path, model),
                })
    except Exception as err:  # every rank must reach the same collectives below
        error = err
    raise_if_any_rank_failed(error, f"writing checkpoint step {state.step} (staging folder {ckpt.path})",
                             _ERROR_TYPES)

    with module_weights_left_out(engine):
        engine.save_checkpoint(str(ckpt.path), tag=DEEPSPEED_TAG, save_latest=False, exclude_frozen_parameters=True)
    if rank == 0:
        for script in _DEEPSPEED_RECOVERY_SCRIPTS:  # DeepSpeed copies them next to its tag folder
            (ckpt.path / script).unlink(missing_ok=True)
    return manager.commit(ckpt, metadata)


def _write_model_description(folder: Path, model: nn.Module) -> dict[str, Any]:
    """Rank 0: the model's config and, for a PEFT-wrapped model, its LoRA config, so that the checkpoint can be
    rebuilt for inference without the recipe. Returns the layout entries naming the files."""
    from .lora import unwrap_model

    try:
        config = unwrap_model(model).config
    except TypeError:  # not an OmniMoeForCausalLM (e.g. a test's toy model): nothing omni/loading.py could load
        return {"model_config_file": None, "lora_config_dir": None}
    write_json(folder / MODEL_CONFIG_FILE, _without_local_paths(json.loads(config.to_json_string(use_diff=False))))
    peft_configs = getattr(model, "peft_config", None) or {}
    if len(peft_configs) > 1:
        raise CheckpointLayoutError(f"the model carries {len(peft_configs)} PEFT adapters {sorted(peft_configs)}; "
                                    "a checkpoint describes one")
    for lora_config in peft_configs.values():
        lora_config.save_pretrained(str(folder / LORA_CONFIG_DIR))
    return {"model_config_file": MODEL_CONFIG_FILE, "lora_config_dir": LORA_CONFIG_DIR if peft_configs else None}


def _without_local_paths(config: dict) -> dict:
    """The config minus `_name_or_path` (at every level): a folder on the machine that trained it, which a
    checkpoint shared or uploaded should not disclose and nothing loading it needs."""
    return {key: _without_local_paths(value) if isinstance(value, dict) else value
            for key, value in config.items() if key != "_name_or_path"}


# ------------------------------------------------------------------------------------------------ loading
def _verify_everywhere(path: Path, verify: str) -> None:
    """Rank 0 checks the manifest (hashing every file once, not once per rank); every rank then raises the same
    CheckpointIntegrityError naming the file, before anything is read."""
    failure = None
    if _world()[0] == 0:
        try:
            CheckpointManager(path.parent, keep_last=None).verify(path, mode=verify)
        except CheckpointIntegrityError as err:
            failure = {"file": err.file, "reason": err.reason}
        except (OSError, ValueError, KeyError, TypeError) as err:  # e.g. an unreadable manifest
            failure = {"file": "manifest.json", "reason": f"{type(err).__name__}: {err}"}
    agreed = first_failure(failure)
    if agreed is not None:
        raise raised_on_every_rank(CheckpointIntegrityError(path, agreed[1]["file"], agreed[1]["reason"]))


def latest_training_checkpoint(manager: CheckpointManager) -> Path | None:
    """Collective: the newest committed checkpoint under `manager.root` whose manifest verifies (mode
    `manager.verify_on_load`; corrupt or partial ones are skipped with a warning), chosen by rank 0 and the same
    on every rank; None when there is none (start from scratch)."""
    choice = None
    if _world()[0] == 0:
        found = manager.latest_valid()
        choice = None if found is None else str(found)
    choice = broadcast_json(choice, 0)
    return None if choice is None else Path(choice)


@torch.no_grad()
def _load_weights(path: Path, saved: dict[str, Any], model: nn.Module, ep_size: int) -> None:
    """Fill the model in place from our files: dense entries strictly by key and shape, expert entries by global
    id from whichever saved EP shard holds them (global id g was on saved EP rank g % saved_ep_size)."""
    dense, experts = _split_state(model)
    stored = load_tensors(path / saved["dense_file"])
    missing, unexpected = sorted(set(dense) - set(stored)), sorted(set(stored) - set(dense))
    if missing or unexpected:
        raise CheckpointLayoutError(f"{path / saved['dense_file']}: missing {missing[:5]}, unexpected {unexpected[:5]}")
    for key, target in dense.items():
        _copy_checked(target, stored[key], f"{saved['dense_file']}:{key}")
    if not experts:
        return
    saved_ep = saved["ep_size"]
    files = {int(ep): rel for ep, rel in saved["expert_files"].items()}
    if sorted(files) != list(range(saved_ep)):
        raise CheckpointLayoutError(f"{path / LAYOUT_FILE}: expert files for EP ranks {sorted(files)}, need 0..{saved_ep - 1}")
    ep_bound = set(saved["ep_bound_keys"])
    if ep_bound and saved_ep != ep_size:
        raise CheckpointLayoutError(f"{sorted(ep_bound)[:3]} are stored per EP shard (their layout interleaves "
                                    f"experts) and cannot be resharded from EP={saved_ep} to EP={ep_size}")
    with contextlib.ExitStack() as stack:
        handles: dict[int, tuple[Any, set[str]]] = {}  # EP rank -> (open file, its keys); read lazily

        def read(ep_rank: int, key: str) -> torch.Tensor:
            if ep_rank not in handles:
                handle = stack.enter_context(SafetensorsFile(path / files[ep_rank]))
                handles[ep_rank] = handle, set(handle.keys())
            handle, keys = handles[ep_rank]
            if key not in keys:
                raise CheckpointLayoutError(f"{files[ep_rank]}: has no tensor {key!r}")
            return handle.get_tensor(key)

        for key, (target, ids) in experts.items():
            if is_expert_key(key):
                for local, global_id in enumerate(ids):
                    source = read(global_id % saved_ep, f"{key}{EXPERT_SEPARATOR}{global_id}")
                    _copy_checked(target[local], source, f"{key} expert {global_id}")
            elif key in ep_bound:  # saved whole by this same EP rank (same EP size checked above)
                _copy_checked(target, read(getattr(grouped_experts(moe_blocks(model)[0]), "ep_rank", 0), key), key)
            else:
                raise CheckpointLayoutError(f"{key}: not in the checkpoint's expert files")


def _copy_checked(target: torch.Tensor, source: torch.Tensor, what: str) -> None:
    if target.shape != source.shape:
        raise CheckpointLayoutError(f"{what}: checkpoint shape {tuple(source.shape)} != model {tuple(target.shape)}")
    target.copy_(source)


def _apply_scheduler_lr(setup: EngineSetup) -> None:
    """After `load_state_dict` DeepSpeed's schedulers know their iteration but the optimizer groups still hold the
    lr of a fresh run until the next step: set the lr of the restored iteration now."""
    scheduler = setup.lr_scheduler
    if scheduler is None or not hasattr(scheduler, "get_lr"):
        return
    for group, lr in zip(setup.engine.optimizer.param_groups, scheduler.get_lr(), strict=True):
        group["lr"] = lr


def load_training_checkpoint(path: str | Path, setup: EngineSetup, model: nn.Module,
                             verify: str = "full") -> TrainingState:
    """Collective: every rank calls it right after `initialize_engine`, with the model the engine trains.
    Returns this rank's TrainingState (its data position when the world size is unchanged, else `data_state={}`)."""
    path = Path(path)
    rank, world = _world()
    engine = setup.engine
    _verify_everywhere(path, verify)
    saved = read_json(path / LAYOUT_FILE)
    if saved.get("format") != LAYOUT_FORMAT or saved.get("format_version") != LAYOUT_FORMAT_VERSION:
        raise CheckpointLayoutError(f"{path / LAYOUT_FILE}: not a {LAYOUT_FORMAT} v{LAYOUT_FORMAT_VERSION} layout")
    now = current_layout(setup, model)
    same = _same_layout(saved, now)

    error = None
    try:
        if same:  # optimizer partitions, scheduler, counters; the module is left alone (custom_load_fn)
            with weights_only_deepspeed_loads(engine):
                load_path, _ = engine.load_checkpoint(
                    str(path), tag=saved["deepspeed_tag"], load_optimizer_states=True, load_lr_scheduler_states=True,
                    custom_load_fn=ignore_deepspeed_module_state)
            if load_path is None:
                raise CheckpointLayoutError(f"{path / saved['deepspeed_tag']}: DeepSpeed found no checkpoint to load")
        # after DeepSpeed's load: the weights of every rank come from our files, whatever DeepSpeed touched
        _load_weights(path, saved, model, setup.layout.ep_size)
    except Exception as err:  # agree first, so no rank is left waiting in a collective
        error = err
    raise_if_any_rank_failed(error, f"loading {path}", _ERROR_TYPES)

    state_file = path / f"rank-{rank if saved['world_size'] == world else 0:05d}" / STATE_FILE
    state = TrainingState.load(state_file)
    if same:
        check_master_weights(setup)
    else:
        if hasattr(engine.optimizer, "refresh_fp32_params"):
            engine.optimizer.refresh_fp32_params()  # fresh optimizer: master copies start from the loaded weights
        check_master_weights(setup)
        if setup.lr_scheduler is not None and state.scheduler_state:
            setup.lr_scheduler.load_state_dict(state.scheduler_state)
            _apply_scheduler_lr(setup)
        for counter, value in saved["engine"].items():
            setattr(engine, counter, value)
    engine.micro_steps = engine.global_steps * engine.gradient_accumulation_steps()

    rng_restored = saved["world_size"] == world
    if rng_restored:
        load_rng_state(path / f"rank-{rank:05d}" / RNG_FILE)
    else:
        state = dataclasses.replace(state, data_state={})
    if not same and rank == 0:
        logger.warning(
            "checkpoint %s was saved with world size %d, EP %d, ZeRO-%d%s and is loaded with world size %d, EP %d, "
            "ZeRO-%d%s: weights resharded by global expert id; RESET: optimizer state (Adam moments and step count "
            "restart from zero, fp32 master weights rebuilt from the saved weights)%s; restored: LR scheduler "
            "position, step counters (global step %d), TrainingState",
            path, saved["world_size"], saved["ep_size"], saved["zero_stage"], " bf16" if saved["bf16"] else "",
            world, now["ep_size"], now["zero_stage"], " bf16" if now["bf16"] else "",
            "" if rng_restored else ", per-rank RNG streams and data-loader positions (the world size changed; "
            "the returned TrainingState has data_state={})",
            saved["engine"]["global_steps"],
        )
    return state


__all__ = [
    "DEEPSPEED_TAG", "DENSE_FILE", "EXPERT_FILE", "EXPERT_SEPARATOR", "LAYOUT_FILE", "LAYOUT_FORMAT",
    "LAYOUT_FORMAT_VERSION", "LORA_CONFIG_DIR", "MODEL_CONFIG_FILE", "RNG_FILE", "STATE_FILE", "CheckpointLayoutError",
    "current_layout", "latest_training_checkpoint", "load_training_checkpoint", "save_training_checkpoint",
]
