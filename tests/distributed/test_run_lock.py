"""One run per output folder (training/run_lock.py).

Two real `omni train` processes on one output folder: the second exits at once naming the first (host and pid),
and the first finishes intact (its stage is DONE and its checkpoint verifies byte for byte). In-process: the lock
names its holder, is released by close, and checkpoint staging folders carry the run id.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.launching import REPO_ROOT, launcher_env, small_synth_shards
from training.checkpoint import CheckpointManager
from training.run_lock import LOCK_FILE, RunLock, RunLockHeld

RECIPE = "tests/distributed/loop_recipe.yaml"
STAGE = "stages=[{name: experts, preset: modality_experts, steps: 3, optimizer: {lr: 1.0e-2, warmup_steps: 1}}]"
TIMEOUT_S = 240


def _train_command(data: dict, output: Path) -> list[str]:
    return [sys.executable, "-m", "omni.cli", "train", RECIPE, f"run.output_dir={output}",
            f"model.tokenizer.bpe_from={data['manifest']}", f"data.sources.synth={data['shards']}",
            "data.samples_per_epoch=8", "run.nproc_per_node=1", "parallel.ep_size=1", "train.save_every=1",
            "train.keep_last=2", "train.timeout_s=120", STAGE]


def test_a_second_train_on_the_same_folder_exits_naming_the_first(tmp_path):
    data = small_synth_shards(tmp_path / "synth")
    output = tmp_path / "run"
    env = launcher_env()
    first = subprocess.Popen(_train_command(data, output), cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while not (output / LOCK_FILE).is_file() or f'"pid": {first.pid}' not in (output / LOCK_FILE).read_text():
            assert first.poll() is None and time.monotonic() < deadline, "the first run never took the lock"
            time.sleep(0.2)
        started = time.monotonic()
        second = subprocess.run(_train_command(data, output), cwd=REPO_ROOT, env=env, capture_output=True,
                                text=True, timeout=TIMEOUT_S)
        assert second.returncode == 3, second.stdout[-3000:] + second.stderr[-3000:]
        assert f"pid {first.pid}" in second.stderr and socket.gethostname() in second.stderr, second.stderr
        assert time.monotonic() - started < 30  # at once: no model built, nothing written
        out, _ = first.communicate(timeout=TIMEOUT_S)
    finally:
        if first.poll() is None:
            os.killpg(first.pid, 9)
            first.wait()
    assert first.returncode == 0, out[-6000:]
    done = json.loads((output / "experts" / "DONE.json").read_text())
    assert done["steps"] == 3
    manager = CheckpointManager(output / "experts" / "checkpoints", keep_last=None)
    steps = [step for step, _ in manager.committed_steps()]
    assert steps == [3, 2]
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
