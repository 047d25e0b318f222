"""The run: every stage of a recipe in order, in each rank of the job, resumable.

    for each stage not yet DONE:
        build        tokenizer -> model plan (training/build.py) -> weights -> processor -> this rank's loader
        parallelize  experts sharded, LoRA, freezing, DeepSpeed engine (training/parallelize.py)
        train        training/loop.py (resumes from the stage's latest valid checkpoint by itself)
        hand off     the stage kind's export -> OUTPUT/<stage>/model (training/stage_export.py), then DONE.json
        eval         held-out split on what was exported (training/stage_eval.py; after DONE.json, so a failing
                     eval never costs the stage)

What differs between stages is data: a `StageKind` says how its model is planned, what its loader keeps, whether
experts are spread over ranks, how the model is exported and evaluated, and which forward gives the loss. A new kind
(e.g. preference tuning) is one more entry in STAGE_KINDS, not a second trainer.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from .build import build_loader, build_model, check_local_world_size, compute_dtype, load_tokenizer, plan_model
from .distributed import barrier, get_rank, init_distributed, seed_everything, set_cpu_threads_per_rank, teardown
from .loop import model_loss, train_stage
from .lora import unwrap_model
from .parallelize import parallelize
from .recipe import Recipe
from .run_folder import hold_output_folder, save_run_recipe
from .run_lock import RunLock
from .stage_export import export_dense_llm, export_moe_model
from .stage_spec import StageSpec

DONE_FILE = "DONE.json"
MODEL_DIR = "model"


@dataclass(frozen=True)
class StageKind:
    """How one kind of stage differs from another; everything else is the same pipeline."""

    name: str
    text_only: bool  # the loader strips media and eval keeps text samples (a dense LLM has no media tower)
    expert_parallel: bool  # spread experts over parallel.ep_size ranks (a dense model has none: pure DP)
    export: Callable[[Any, Path, Any, Any], None]  # (StageResult, folder, tokenizer, processor)
    hands_off: str  # what the next stage gets: "moe" (continue from the folder) or "dense" (upcycle it)
    forward: Callable = model_loss  # (engine, inputs) -> output with .loss


def _export_dense(result, folder: Path, tokenizer, processor) -> None:
    export_dense_llm(result.model, folder, tokenizer)


def _export_moe(result, folder: Path, tokenizer, processor) -> None:
    export_moe_model(result.model, result.setup.layout.ep_group, folder, tokenizer, processor)


STAGE_KINDS = {
    "dense_lm": StageKind("dense_lm", text_only=True, expert_parallel=False, export=_export_dense, hands_off="dense"),
    "moe": StageKind("moe", text_only=False, expert_parallel=True, export=_export_moe, hands_off="moe"),
}


def stage_kind(stage: StageSpec) -> StageKind:
    return STAGE_KINDS["dense_lm" if stage.preset == "dense_pretrain" else "moe"]


def run_training(recipe: Recipe, run_lock: RunLock | None = None) -> int:
    """Every stage in order, in this process (one rank of the job). `run_lock`: this process's lock on the output
    folder; without it rank 0 takes the lock (or inherits the launching `omni train`'s)."""
    check_local_world_size(recipe, dict(os.environ))
    set_cpu_threads_per_rank()
    init_distributed(timeout_s=recipe.train.timeout_s)
    output = Path(recipe.run.output_dir)
    taken, run_id = hold_output_folder(output, run_lock)
    try:
        return _run_stages(recipe, output, run_id)
    finally:
        if taken is not None:
            taken.release()


@dataclass
class HandOff:
    """What the finished stages left for the next one."""

    moe_model: Path | None = None  # the previous stage's exported MoE model: continue from it
    dense_llm: Path | None = None  # a dense_lm stage's exported LLM: upcycle it

    def after(self, kind: StageKind, folder: Path) -> "HandOff":
        return HandOff(dense_llm=folder) if kind.hands_off == "dense" else HandOff(moe_model=folder)


@dataclass
class BuiltStage:
    """A stage after the build step, before parallelize."""

    kind: StageKind
    tokenizer: Any
    model: Any  # OmniMoeForCausalLM, whole on every rank
    processor: Any
    loader: Any


def build_stage(recipe: Recipe, index: int, hand_off: HandOff | None = None) -> BuiltStage:
    """Collective (the tokenizer). The build step of stage `index`: identical initial weights on every rank, then
    per-rank random streams (seed + index + rank; a resume restores them instead)."""
    from omni_moe.modeling.processing_omni import OmniMoeProcessor

    hand_off = hand_off or HandOff()
    stage = recipe.stages[index]
    kind = stage_kind(stage)
    seed_everything(recipe.run.seed, rank_offset=False)
    tokenizer = load_tokenizer(recipe, hand_off.moe_model or hand_off.dense_llm or recipe.model.from_)
    plan = plan_model(recipe, stage, tokenizer, source=hand_off.moe_model, dense_source=hand_off.dense_llm)
    model = build_model(plan, compute_dtype(recipe))
    processor = OmniMoeProcessor.from_config(model.config, tokenizer)
    loader = build_loader(recipe, stage, processor, index, strip_media=kind.text_only)
    seed_everything(recipe.run.seed + index)
    return BuiltStage(kind, tokenizer, model, processor, loader)


def train_built_stage(recipe: Recipe, index: int, built: BuiltStage, run_id: str = ""):
    """Collective: parallelize and train stage `index`; returns the loop's StageResult."""
    stage = recipe.stages[index]
    parallel = recipe.parallel if built.kind.expert_parallel else dataclasses.replace(recipe.parallel, ep_size=1)
    micro_batch_size = int(recipe.data.batching.get("batch_size") or 1)
    parallelized = parallelize(built.model, stage, parallel, recipe.train, micro_batch_size)
    return train_stage(parallelized, stage, recipe.train, built.loader,
                       stage_dir=Path(recipe.run.output_dir) / stage.name, run_id=run_id,
                       media_dtype=compute_dtype(recipe), forward=built.kind.forward)


def _run_stages(recipe: Recipe, output: Path, run_id: str) -> int:
    from .stage_eval import evaluate_stage

    if get_rank() == 0:
        save_run_recipe(recipe, output)
    hand_off = HandOff()
    for index, stage in enumerate(recipe.stages):
        kind = stage_kind(stage)
        stage_dir = output / stage.name
        if (stage_dir / DONE_FILE).is_file():
            hand_off = hand_off.after(kind, stage_dir / MODEL_DIR)
            if get_rank() == 0:
                print(f"omni train: stage {stage.name} already done ({stage_dir / DONE_FILE}); skipping", flush=True)
            continue
        built = build_stage(recipe, index, hand_off)
        result = train_built_stage(recipe, index, built, run_id)
        if not result.finished:
            if get_rank() == 0:
                print(f"omni train: stopped at step {result.state.step} of stage {stage.name} "
                      f"(train.stop_after_steps); re-run the same command to continue", flush=True)
            break
        # hand off, then eval what a user gets
        kind.export(result, stage_dir / MODEL_DIR, built.tokenizer, built.processor)
        if get_rank() == 0:
            (stage_dir / DONE_FILE).write_text(json.dumps({
                "stage": stage.name, "steps": result.state.step, "model": str(stage_dir / MODEL_DIR),
                "tokens_seen": result.state.tokens_seen, "samples_seen": result.state.samples_seen,
            }, indent=2) + "\n")
            print(f"omni train: stage {stage.name} done -> {stage_dir / MODEL_DIR}", flush=True)
        barrier()
        evaluate_stage(recipe, stage.name, _eval_model(recipe, kind, result, stage_dir), built.processor, stage_dir,
                       text_only=kind.text_only, final=index == len(recipe.stages) - 1)
        hand_off = hand_off.after(kind, stage_dir / MODEL_DIR)
        del result, built
    teardown()
    return 0  # stopped early on purpose (stop_after_steps) is a success too


def _eval_model(recipe: Recipe, kind: StageKind, result, stage_dir: Path):
    """The model eval scores, on the engine's device in the run's precision: the exported folder (what a user
    downloads); a dense LLM is whole on every rank already."""
    if kind.hands_off == "dense":
        return unwrap_model(result.model)
    import torch

    from omni_moe.modeling.modeling_omni import OmniMoeForCausalLM

    model = OmniMoeForCausalLM.from_pretrained(str(stage_dir / MODEL_DIR), dtype=compute_dtype(recipe))
    return model.to(torch.device(result.setup.engine.device))


__all__ = ["DONE_FILE", "MODEL_DIR", "STAGE_KINDS", "BuiltStage", "HandOff", "StageKind", "build_stage", "run_training",
           "stage_kind", "train_built_stage"]
