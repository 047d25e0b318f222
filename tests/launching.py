"""Starting `omni` commands and launchers from tests: a clean environment and a bounded run in its own session.

Every launcher test runs real processes (torchrun and its ranks); a timeout kills the whole session, so no rank
outlives its test.
"""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
LAUNCH_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def launcher_env(**extra: str) -> dict[str, str]:
    """This environment with the repository importable, one thread per rank, unbuffered output, and no distributed
    variables leaking in from an outer launcher."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", **extra)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    for name in LAUNCH_VARIABLES:
        env.pop(name, None)
    return env


def run_in_session(command: list[str], *, timeout_s: float, cwd: Path = REPO_ROOT, env: dict | None = None,
                   check: bool = True) -> subprocess.CompletedProcess:
    """Run `command` in a new session (stdout and stderr together); on timeout kill the whole session and fail the
    test; with `check`, fail it on a non-zero exit too, showing the end of the output."""
    proc = subprocess.Popen(command, cwd=cwd, env=env or launcher_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        pytest.fail(f"{' '.join(command[:6])} timed out after {timeout_s} s:\n{out[-6000:]}")
    if check:
        assert proc.returncode == 0, f"{' '.join(command[:6])} failed ({proc.returncode}):\n{out[-8000:]}"
    return subprocess.CompletedProcess(command, proc.returncode, out, "")


def small_synth_shards(root: Path, num: int = 44, per_shard: int = 11) -> dict[str, str]:
    """A tiny synthetic train split and its shards (4 shards by default: a multiple of 2 ranks x 1 reader) ->
    {"manifest", "shards"} paths for recipe overrides."""
    from omni_moe.data.quality import DropPolicy
    from omni_moe.data.shards import build_shards
    from omni_moe.data.synth import generate

    manifest = generate(root, seed=0, splits={"train": num})["train"]
    build_shards(manifest, root, root / "shards", max_samples_per_shard=per_shard, policy=DropPolicy(strict=True),
                 progress=False)
    return {"manifest": str(manifest), "shards": str(root / "shards")}
