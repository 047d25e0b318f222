"""One run per output folder (training/run_lock.py).

Two real `omni train` processes started together on one output folder: the one that loses the race for the lock
exits at once naming the other (host and pid), and the other finishes intact (its stage is DONE and its checkpoint verifies byte for byte). In-process: the lock
names its holder, is released by close, and checkpoint staging folders carry the run id.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tests.launching import REPO_ROOT, launcher_env, small_synth_shards
from omni_moe.training.checkpoint_store import CheckpointManager
from omni_moe.training.run_lock import RunLock, RunLockHeld

RECIPE = "tests/distributed/loop_recipe.yaml"
STAGE = "stages=[{name: experts, preset: modality_experts, steps: 3, optimizer: {lr: 1.0e-2, warmup_steps: 1}}]"
TIMEOUT_S = 240


def _train_command(data: dict, output: Path) -> list[str]:
    return [sys.executable, "-m", "omni.cli", "train", RECIPE, f"run.output_dir={output}",
            f"model.tokenizer.bpe_from={data['manifest']}", f"data.sources.synth={data['shards']}",
            "data.samples_per_epoch=8", "run.nproc_per_node=1", "parallel.ep_size=1", "train.save_every=1",
            "train.keep_last=2", "train.timeout_s=120", STAGE]


def test_a_second_train_on_the_same_folder_exits_naming_the_first(tmp_path):
    """Both start together: whichever takes the lock first trains, the other exits at once naming it."""
    data = small_synth_shards(tmp_path / "synth")
    output = tmp_path / "run"
    env = launcher_env()
    runs = [subprocess.Popen(_train_command(data, output), cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True, start_new_session=True) for _ in range(2)]
    try:
        outputs = [run.communicate(timeout=TIMEOUT_S)[0] for run in runs]
    finally:
        for run in runs:
            if run.poll() is None:
                os.killpg(run.pid, 9)
                run.wait()
    codes = [run.returncode for run in runs]
    assert sorted(codes) == [0, 3], "\n".join(o[-3000:] for o in outputs)
    winner, loser = (0, 1) if codes[0] == 0 else (1, 0)
    message = outputs[loser]
    assert f"in use by another run: host {socket.gethostname()} pid {runs[winner].pid}" in message, message
    assert "Loading weights" not in message and "stage experts" not in message  # it stopped before any work
    done = json.loads((output / "experts" / "DONE.json").read_text())
    assert done["steps"] == 3
    manager = CheckpointManager(output / "experts" / "checkpoints", keep_last=None)
    assert [step for step, _ in manager.committed_steps()] == [3, 2]
    for _, path in manager.committed_steps():
        manager.verify(path, mode="full")
    # the lock died with its holder: a later run may take it
    RunLock(output).acquire().release()


def test_lock_names_its_holder_and_frees_on_release(tmp_path):
    first = RunLock(tmp_path, run_id="aaaa").acquire()
    with pytest.raises(RunLockHeld, match=rf"host {socket.gethostname()} pid {os.getpid()} \(run aaaa"):
        RunLock(tmp_path).acquire()
    first.release()
    RunLock(tmp_path).acquire().release()


def test_staging_folders_carry_the_run_id(tmp_path):
    staged = CheckpointManager(tmp_path, run_id="run7").begin(4)
    assert staged.path.name == ".staging-run7-step-000004"
    with pytest.raises(ValueError, match="run_id"):
        CheckpointManager(tmp_path, run_id="../x")
