"""`omni train RECIPE [key=value ...] [--dry-run]`: run a training recipe, stage after stage, resumable.

This module parses the command line and launches; the run itself is training/pipeline.py.

    omni train recipes/tiny_omni.yaml                          # every stage; re-run the same command to resume
    omni train recipes/tiny_omni.yaml train.save_every=2 stages.0.steps=10
    omni train recipes/tiny_omni.yaml --dry-run                # config, data plan, parameter/expert layout

Outside a distributed launch (no RANK / WORLD_SIZE) with `run.nproc_per_node > 1`, the command re-launches itself
through `torchrun --standalone` (the same path multi-node launches take, see launch/torchrun.sh), one thread per
rank on CPU. Before any process starts: the recipe is validated (every key), every path it names is checked
(training/recipe_paths.py), the output folder is locked (training/run_lock.py: a second run on the folder exits at
once naming the holder) and the synthetic dataset is made if the recipe asks (training/run_folder.py). Each rank
then runs `omni_moe.training.pipeline.run_training`; once every stage is done, omni/run_summary.py prints the eval
table, exports OUTPUT/export and shows a few chat answers.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys

from omni.run_summary import finish_run
from omni_moe.training.dry_run import dry_run_report
from omni_moe.training.pipeline import run_training
from omni_moe.training.recipe import RecipeError, load_recipe
from omni_moe.training.recipe_paths import check_recipe_paths
from omni_moe.training.run_folder import SynthDataConflict, prepare_synth_data
from omni_moe.training.run_lock import RUN_ID_ENV, RunLock, RunLockHeld


def add_parser(sub) -> None:
    p = sub.add_parser("train", help="train a recipe (YAML) stage after stage; re-run the command to resume",
                       description=__doc__.split("\n\n")[0])
    p.add_argument("recipe", help="recipe YAML file (its first line shows the command that runs it)")
    # REMAINDER: overrides may come before or after --dry-run (run() picks the flag out of them)
    p.add_argument("overrides", nargs=argparse.REMAINDER, metavar="KEY=VALUE",
                   help="dotted overrides, values as YAML scalars: train.save_every=2 stages.0.steps=10")
    p.add_argument("--dry-run", action="store_true",
                   help="print the resolved config, the data plan and the parameter/expert layout; load no weights")
    p.set_defaults(handler=run)


def run(args: argparse.Namespace, rest=None) -> int:
    if "--dry-run" in args.overrides:
        args.dry_run = True
        args.overrides = [o for o in args.overrides if o != "--dry-run"]
    try:
        recipe = load_recipe(args.recipe, args.overrides)
        check_recipe_paths(recipe, plan_only=args.dry_run)  # the dry run reads the model configs alone
    except RecipeError as exc:
        print(f"omni train: {exc}", file=sys.stderr)
        return 2
    if args.dry_run:
        try:
            print(dry_run_report(recipe))
        except (RecipeError, ValueError, FileNotFoundError) as exc:  # e.g. an EP size the world cannot hold
            print(f"omni train --dry-run: {exc}", file=sys.stderr)
            return 2
        return 0
    launched = "RANK" in os.environ or "WORLD_SIZE" in os.environ
    if launched:  # a rank of a torchrun job: rank 0 takes (or inherits) the output folder's lock
        try:
            return run_training(recipe)
        except RecipeError as exc:  # e.g. run.nproc_per_node against the launcher's LOCAL_WORLD_SIZE
            print(f"omni train: {exc}", file=sys.stderr)
            return 2
        except RunLockHeld as exc:
            print(f"omni train: {exc}", file=sys.stderr)
            return 3
    try:  # one run per output folder, taken before anything is written (training/run_lock.py)
        lock = RunLock(recipe.run.output_dir).acquire()
    except RunLockHeld as exc:
        print(f"omni train: {exc}", file=sys.stderr)
        return 3
    try:
        prepare_synth_data(recipe)
        if recipe.run.nproc_per_node > 1:
            code = relaunch_with_torchrun(args.recipe, args.overrides, recipe.run.nproc_per_node, run_id=lock.run_id)
        else:
            code = run_training(recipe, run_lock=lock)
        if code == 0:
            finish_run(recipe)  # eval table, OUTPUT/export, chat answers (once the last stage is done)
    except (RunLockHeld, SynthDataConflict) as exc:
        print(f"omni train: {exc}", file=sys.stderr)
        return 3
    finally:
        lock.release()
    return code


def relaunch_with_torchrun(recipe_path: str, overrides: list[str], nproc: int, run_id: str | None = None) -> int:
    """`torchrun --standalone --nproc_per_node N -m omni.cli train RECIPE ...`; returns its exit code. `run_id`: the
    run whose lock this process holds on the output folder (rank 0 checks it instead of taking the lock)."""
    import torch

    env = dict(os.environ)
    if run_id is not None:
        env[RUN_ID_ENV] = run_id
    if not torch.cuda.is_available():
        env.setdefault("OMP_NUM_THREADS", "1")  # N ranks sharing the cores: one thread each (2 ranks on 2 cores: ~10x faster)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               "-m", "omni.cli", "train", recipe_path, *overrides]
    print("omni train: launching " + " ".join(command[1:]), file=sys.stderr, flush=True)
    return subprocess.call(command, env=env)


__all__ = ["add_parser", "relaunch_with_torchrun", "run"]
