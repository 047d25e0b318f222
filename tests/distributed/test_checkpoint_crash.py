"""A rank SIGKILLed during a checkpoint write (2 real processes, gloo on loopback): the partial checkpoint is never
loaded; a fresh manager finds the previous one, and the next `begin` clears the debris.

Each job commits step 2, then starts step 4. The victim rank pauses at the chosen moment, announces its pid through
a file, and the test (watching that file from a thread) SIGKILLs it; its peer is left blocked in a barrier until the
spawn helper kills the rest of the job. Every process is bounded by the helper's timeout and the process-group
timeout, and the victim gives up waiting after KILL_WAIT_S.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from omni_moe.training.checkpoint_files import load_tensors, save_tensors
from omni_moe.training.checkpoint_store import COMMITTED, MANIFEST, CheckpointIntegrityError, CheckpointManager

KILL_WAIT_S = 30.0  # how long a victim waits to be killed before failing on its own
JOB_TIMEOUT_S = 60.0
PG_TIMEOUT_S = 20.0


def _write_parts(ckpt, rank: int, step: int, parts: range) -> None:
    for part in parts:
        save_tensors(ckpt.rank_dir / f"part-{part}.safetensors", {"x": torch.full((64,), float(100 * step + rank))})


def _pause_for_kill(signal_dir: Path, rank: int) -> None:
    """Announce this process's pid (atomically) and wait for the test's SIGKILL."""
    tmp = signal_dir / f".kill-rank{rank}.tmp"
    tmp.write_text(str(os.getpid()))
    os.replace(tmp, signal_dir / f"kill-rank{rank}")
    time.sleep(KILL_WAIT_S)
    raise RuntimeError(f"rank {rank} was not killed within {KILL_WAIT_S} s")


def crash_worker(rank: int, world_size: int, args: dict) -> dict:
    root, signal_dir, mode, victim = Path(args["root"]), Path(args["signal_dir"]), args["mode"], args["victim"]
    manager = CheckpointManager(root, keep_last=3, rank=rank, world_size=world_size, barrier=dist.barrier)

    ckpt = manager.begin(2)
    _write_parts(ckpt, rank, 2, range(2))
    if rank == 0:
        save_tensors(ckpt.path / "dense.safetensors", {"w": torch.full((8,), 2.0)})
    manager.commit(ckpt, metadata={"step": 2})

    ckpt = manager.begin(4)
    if rank == 0:
        save_tensors(ckpt.path / "dense.safetensors", {"w": torch.full((8,), 4.0)})
    if mode == "mid_write" and rank == victim:
        _write_parts(ckpt, rank, 4, range(1))  # half of this rank's files ...
        _pause_for_kill(signal_dir, rank)  # ... and killed before the other half
    _write_parts(ckpt, rank, 4, range(2))
    if mode == "before_marker" and rank == victim:
        publish_marker = manager._write_commit_marker

        def killed_before_marker(final_path: Path) -> None:
            _pause_for_kill(signal_dir, rank)  # the folder is already renamed to step-000004
            publish_marker(final_path)

        manager._write_commit_marker = killed_before_marker
    manager.commit(ckpt, metadata={"step": 4})
    return {"survived": True}  # unreachable when the kill lands


def _run_job_and_kill(spawn, tmp_path: Path, mode: str, victim: int) -> Path:
    """Run the 2-rank job, SIGKILL `victim` when it announces itself; return the checkpoint root."""
    from conftest import WorkerError, WorkerTimeout

    root, signal_dir = tmp_path / "ckpts", tmp_path / "signals"
    signal_dir.mkdir()
    killed: dict[str, int] = {}
    stop = threading.Event()

    def watch_and_kill() -> None:
        announce = signal_dir / f"kill-rank{victim}"
        deadline = time.monotonic() + JOB_TIMEOUT_S
        while not stop.is_set() and time.monotonic() < deadline:
            if announce.exists():
                pid = int(announce.read_text())
                os.kill(pid, signal.SIGKILL)
                killed["pid"] = pid
                return
            time.sleep(0.02)

    watcher = threading.Thread(target=watch_and_kill, daemon=True)
    watcher.start()
    try:
        with pytest.raises(WorkerError) as excinfo:
            spawn("tests.distributed.test_checkpoint_crash:crash_worker", 2,
                  {"root": str(root), "signal_dir": str(signal_dir), "mode": mode, "victim": victim},
                  timeout_s=JOB_TIMEOUT_S, pg_timeout_s=PG_TIMEOUT_S)
    finally:
        stop.set()
        watcher.join(timeout=5)
    assert killed, f"rank {victim} never reached the kill point:\n{excinfo.value}"
    assert not isinstance(excinfo.value, WorkerTimeout), str(excinfo.value)
    assert f"--- rank {victim}: exit code -{int(signal.SIGKILL)} ---" in str(excinfo.value), str(excinfo.value)
    return root


def _assert_recovers_to_step_2(root: Path, partial: Path) -> None:
    manager = CheckpointManager(root, keep_last=3)  # a fresh job on one process
    latest = manager.latest_valid()
    assert latest == root / "step-000002", f"expected the previous checkpoint, got {latest}"
    assert torch.equal(load_tensors(latest / "dense.safetensors")["w"], torch.full((8,), 2.0))
    assert torch.equal(load_tensors(latest / "rank-00001" / "part-1.safetensors")["x"], torch.full((64,), 201.0))
    assert [step for step, _ in manager.committed_steps()] == [2]
    with pytest.raises(CheckpointIntegrityError) as excinfo:
        manager.verify(partial)
    assert excinfo.value.file == COMMITTED

    ckpt = manager.begin(4)  # the resumed job re-saves step 4: the debris goes first
    assert not partial.exists() or partial == ckpt.path and not any(ckpt.path.iterdir())
    save_tensors(ckpt.path / "dense.safetensors", {"w": torch.full((8,), 4.0)})
    assert manager.commit(ckpt) == manager.latest_valid() == root / "step-000004"
    assert sorted(p.name for p in root.iterdir()) == ["step-000002", "step-000004"]


def test_kill_during_a_rank_write_leaves_the_previous_checkpoint_in_charge(spawn, tmp_path):
    root = _run_job_and_kill(spawn, tmp_path, mode="mid_write", victim=1)
    partial = root / ".staging-step-000004"
    assert (partial / "rank-00001" / "part-0.safetensors").is_file(), "the kill should land mid-write"
    assert not (partial / "rank-00001" / "part-1.safetensors").exists()
    assert not (root / "step-000004").exists() and not (partial / COMMITTED).exists()
    _assert_recovers_to_step_2(root, partial)


def test_kill_between_rename_and_committed_marker_is_never_loaded(spawn, tmp_path):
    root = _run_job_and_kill(spawn, tmp_path, mode="before_marker", victim=0)
    partial = root / "step-000004"
    assert (partial / MANIFEST).is_file() and not (partial / COMMITTED).exists(), "the kill should land pre-marker"
    assert not (root / ".staging-step-000004").exists()
    _assert_recovers_to_step_2(root, partial)
