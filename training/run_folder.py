"""What a run keeps in its output folder besides the stages: the lock, the resolved recipe, the synthetic dataset.

Layout of OUTPUT (`run.output_dir`): .omni-run.lock (held by the run using it: training/run_lock.py), recipe.yaml
(the resolved recipe, secrets scrubbed), tokenizer/ (a BPE trained for the run), and per stage: checkpoints/,
tensorboard/, losses.jsonl, model/, eval.json, DONE.json.
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path

import yaml

from .secret_scrub import scrub_secrets
from .distributed import broadcast_text, get_rank
from .recipe import Recipe
from .run_lock import RUN_ID_ENV, RunLock, RunLockHeld, held_by_run

READY_FILE = "READY.json"  # a finished synthetic dataset


class SynthDataConflict(RuntimeError):
    """data.synth.out holds a finished dataset made by another command or generator version."""


def prepare_synth_data(recipe: Recipe) -> None:
    """`data.synth: {out, num, seed, eval_num, max_samples_per_shard}`: make the synthetic dataset there (one shard set
    per task) unless a previous run finished it with the same settings and generator version (its READY.json). Runs
    once, before the ranks start."""
    from omni_moe.data.synth import SYNTH_VERSION
    from omni_moe.data.synth_shards import make_synth_dataset

    spec = recipe.data.synth
    if spec is None:
        return
    settings = {"num": int(spec.get("num", 4400)), "seed": int(spec.get("seed", 0)), "eval_num": spec.get("eval_num"),
                "max_samples_per_shard": int(spec.get("max_samples_per_shard") or 100)}
    # recorded as the equivalent `omni data synth` command (what a user would type to make the same dataset)
    command = (f"omni data synth {spec['out']} --num {settings['num']} --seed {settings['seed']} --shards-by-task "
               "--overwrite" + (f" --eval-num {settings['eval_num']}" if settings["eval_num"] is not None else "")
               + (f" --max-samples-per-shard {spec['max_samples_per_shard']}"
                  if spec.get("max_samples_per_shard") is not None else ""))
    ready = {"command": command, "synth_version": SYNTH_VERSION}
    out = Path(spec["out"])
    ready_file = out / READY_FILE
    # another `omni train` making this dataset right now fails at once instead of deleting what it writes (inside
    # this run's own output folder, the run's lock covers it already)
    same_folder = out.resolve() == Path(recipe.run.output_dir).resolve()
    with contextlib.nullcontext() if same_folder else RunLock(out):
        if ready_file.is_file():
            try:
                saved = json.loads(ready_file.read_text(encoding="utf-8"))
            except json.JSONDecodeError:
                saved = {}
            if saved == ready:
                return
            # a finished dataset is never regenerated in place: another run may be training on it right now
            raise SynthDataConflict(
                f"data.synth.out {out} holds a finished synthetic dataset made by {saved.get('command')!r} "
                f"(generator {saved.get('synth_version')!r}); this recipe asks for {command!r} (generator "
                f"{SYNTH_VERSION!r}). Delete {out} to remake it, or set data.synth.out to another folder")
        print(f"omni train: making the synthetic dataset: {command}", flush=True)
        for line in make_synth_dataset(out, shards_by_task=True, overwrite=True, **settings):  # replaces a half-made one
            print(line, flush=True)
        ready_file.write_text(json.dumps(ready) + "\n")


def save_run_recipe(recipe: Recipe, output: Path) -> Path:
    """OUTPUT/recipe.yaml: the resolved recipe (omni/loading.py reads it back), through the secret scrubber the
    checkpoints use (a token in an environment variable never lands on disk)."""
    output.mkdir(parents=True, exist_ok=True)
    path = output / "recipe.yaml"
    path.write_text(yaml.safe_dump(scrub_secrets(recipe.raw), sort_keys=False), encoding="utf-8")
    return path


def hold_output_folder(output: Path, run_lock: RunLock | None) -> tuple[RunLock | None, str]:
    """Collective: (the lock this rank took, or None; the run id every rank agrees on). Rank 0 uses the lock of
    this process (`run_lock`), or of the `omni train` that launched it (OMNI_RUN_ID), or takes it; when it cannot,
    every rank raises RunLockHeld with rank 0's message (no rank is left waiting in a collective)."""
    taken, run_id, error = None, "", ""
    if get_rank() == 0:
        inherited = os.environ.get(RUN_ID_ENV)
        if run_lock is not None and run_lock.held:
            run_id = run_lock.run_id
        elif held_by_run(output, inherited):
            run_id = inherited
        else:
            try:
                taken = RunLock(output, run_id=inherited).acquire()
                run_id = taken.run_id
            except RunLockHeld as exc:
                error = str(exc)
    error, run_id = broadcast_text(error), broadcast_text(run_id)
    if error:
        raise RunLockHeld(error)
    return taken, run_id


__all__ = ["READY_FILE", "SynthDataConflict", "hold_output_folder", "prepare_synth_data", "save_run_recipe"]
