"""Run N real worker processes (gloo on loopback) for the distributed tests, with a timeout and clean-up.

Tests get the `spawn` fixture: `spawn("tests.distributed.test_x:worker_fn", world_size=2, args={...})` starts one
Python process per rank, all in ONE process group (so a timeout kills every rank and anything they started), with
torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT from a free port) and
OMP_NUM_THREADS=1 (several ranks share 2 cores). Each rank runs this file as a script: it joins the process group
with a short timeout (a hang fails fast), calls `worker_fn(rank, world_size, args) -> dict`, saves the dict, tears
the group down (barrier + destroy, else workers may SIGABRT at exit), and exits. `spawn` returns the per-rank dicts.

Failures: the first rank that exits non-zero makes the helper kill the rest (after a short grace period so peers can
print) and raise `WorkerError` with every rank's exit code and stderr tail; the overall timeout kills the whole
process group and raises `WorkerTimeout` the same way.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[2]
STDERR_TAIL_CHARS = 4000
FAILURE_GRACE_S = 3.0


class WorkerError(RuntimeError):
    pass


class WorkerTimeout(WorkerError):
    pass


def _tail(path: Path) -> str:
    try:
        text = path.read_text(errors="replace")
    except FileNotFoundError:
        return "<no output>"
    return text[-STDERR_TAIL_CHARS:] if text else "<empty>"


def _report(procs: list[subprocess.Popen], run_dir: Path, headline: str) -> str:
    lines = [headline]
    for rank, proc in enumerate(procs):
        lines.append(f"--- rank {rank}: exit code {proc.returncode} --- stderr tail:")
        lines.append(_tail(run_dir / f"rank{rank}.stderr"))
    return "\n".join(lines)


def _kill_group(pgid: int, procs: list[subprocess.Popen]) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, signal.SIGKILL)
    for proc in procs:
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()


def spawn_workers(
    target: str,
    world_size: int,
    args: dict[str, Any] | None = None,
    timeout_s: float = 120.0,
    pg_timeout_s: float = 30.0,
    init: str = "torch",
    extra_env: dict[str, str] | None = None,
) -> list[dict[str, Any]]:
    """Run `target` ("module:function") on `world_size` processes and return each rank's result dict.

    init: "torch" (a gloo process group only), "deepspeed" (also deepspeed.comm, needed by the engine) or "none".
    pg_timeout_s bounds every collective; timeout_s bounds the whole run.
    """
    from omni_moe.training.distributed import free_port

    if init not in ("torch", "deepspeed", "none"):
        raise ValueError(f"init must be 'torch', 'deepspeed' or 'none', got {init!r}")
    run_dir = Path(tempfile.mkdtemp(prefix="omni_dist_"))
    (run_dir / "args.json").write_text(json.dumps({"args": args or {}, "init": init, "pg_timeout_s": pg_timeout_s}))
    port = free_port()
    procs: list[subprocess.Popen] = []
    pgid = None
    try:
        for rank in range(world_size):
            env = dict(os.environ)
            env.update(
                RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world_size),
                MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1",
                MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1", PYTHONPATH=os.pathsep.join(
                    [str(REPO_ROOT)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else [])
                ),
            )
            env.update(extra_env or {})
            # files, not pipes: a chatty rank can never block on a full pipe; the child keeps its own descriptors
            out_path, err_path = run_dir / f"rank{rank}.stdout", run_dir / f"rank{rank}.stderr"
            with open(out_path, "wb") as stdout, open(err_path, "wb") as stderr:
                proc = subprocess.Popen(
                    [sys.executable, __file__, target, str(run_dir)],
                    cwd=REPO_ROOT, env=env, stdout=stdout, stderr=stderr,
                    process_group=0 if pgid is None else pgid,
                )
            procs.append(proc)
            if pgid is None:
                pgid = proc.pid
        deadline = time.monotonic() + timeout_s
        failed_at = None
        while True:
            codes = [p.poll() for p in procs]
            if all(c == 0 for c in codes):
                break
            if any(c not in (None, 0) for c in codes):
                failed_at = failed_at or time.monotonic()
                if all(c is not None for c in codes) or time.monotonic() - failed_at > FAILURE_GRACE_S:
                    _kill_group(pgid, procs)
                    raise WorkerError(_report(procs, run_dir, f"{target}: a worker failed"))
            if time.monotonic() > deadline:
                _kill_group(pgid, procs)
                raise WorkerTimeout(_report(procs, run_dir, f"{target}: timed out after {timeout_s:.0f} s"))
            time.sleep(0.05)
    finally:
        if pgid is not None and any(p.poll() is None for p in procs):
            _kill_group(pgid, procs)
        # a killed job cannot clean up after itself: never leave DeepSpeed shm buffers in the RAM-backed /dev/shm
        leaked = sorted(Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_127.0.0.1_{port}_*"))
        for path in leaked:
            path.unlink(missing_ok=True)

    if leaked and all(p.returncode == 0 for p in procs):
        raise WorkerError(f"{target}: finished but left DeepSpeed shm buffers behind: {[p.name for p in leaked]}")
    import torch

    return [torch.load(run_dir / f"rank{rank}.pt", weights_only=True) for rank in range(world_size)]


def _worker_main(target: str, run_dir: str) -> None:
    """Entry point of one rank (this file run as a script)."""
    sys.path.insert(0, str(REPO_ROOT))
    import torch

    from omni_moe.training.distributed import init_distributed, teardown

    spec = json.loads((Path(run_dir) / "args.json").read_text())
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    module_name, func_name = target.split(":")
    func = getattr(importlib.import_module(module_name), func_name)
    if spec["init"] != "none":
        init_distributed(timeout_s=spec["pg_timeout_s"], deepspeed_comm=spec["init"] == "deepspeed")
    result = func(rank, world_size, spec["args"])
    torch.save(result, Path(run_dir) / f"rank{rank}.pt")
    if spec["init"] != "none":
        teardown()


if __name__ == "__main__":
    _worker_main(sys.argv[1], sys.argv[2])
else:
    import pytest

    @pytest.fixture(scope="session")
    def spawn():
        """`spawn(target, world_size, args=None, timeout_s=120, pg_timeout_s=30, init="torch") -> [result per rank]`."""
        return spawn_workers
