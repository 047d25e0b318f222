"""The launch scripts for real: a two-"node" job over loopback, torchrun's restart after a SIGKILL, the SLURM and
DeepSpeed-hostfile scripts.

  * two nodes: two invocations of launch/torchrun.sh (NNODES=2, NODE_RANK 0 and 1, one process each) rendezvous on
    127.0.0.1 and train 12 steps of the loop recipe with expert parallelism 2 across the "nodes"; both exit 0 and
    leave one committed checkpoint holding both EP ranks' experts under global ids. This run is also the
    uninterrupted reference of the restart test (same world size 2, EP 2, seed, data and steps).
  * restart: launch/torchrun.sh with MAX_RESTARTS=1 and 2 processes; once rank 0 has logged step 7 the
    test SIGKILLs rank 1's worker process from outside (`KillRankOnce`), torchrun restarts both ranks, they resume
    from the newest committed checkpoint (step 6 or later, before step 12) and finish with the reference's losses
    (==) and exported weights (torch.equal).
  * SLURM: launch/slurm.sbatch under stand-ins for `scontrol`/`srun` (SLURM is not installed here) and a recording
    stand-in for the interpreter, to check what each node's torchrun is given.
  * DeepSpeed: launch/deepspeed_hostfile.sh with `localhost slots=2` runs 2 ranks of `omni train --dry-run` through
    the real DeepSpeed launcher.

Every launcher runs in its own session, and every process it starts carries OMNI_LAUNCH_TEST_TAG in its
environment: torchrun starts its workers in sessions of their own, so killing the launcher's process group would
miss them; cleanup kills every process carrying this run's tag, by pid.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Callable

import pytest
import torch
from safetensors.torch import load_file

from tests.launching import small_synth_shards

REPO_ROOT = Path(__file__).resolve().parents[2]
RECIPE = "tests/distributed/loop_recipe.yaml"
SINGLE_STAGE = "stages=[{name: experts, preset: modality_experts, steps: 12, optimizer: {lr: 1.0e-2, warmup_steps: 1}}]"
LAUNCH_TIMEOUT_S = 240
RESTART_TIMEOUT_S = 2 * LAUNCH_TIMEOUT_S  # the restart test runs the job's start-up and most of its steps twice
FAILURE_GRACE_S = 20  # a failed launcher's peer gets this long to fail by itself (and print why) before it is killed
POLL_S = 0.05  # how often run_launchers checks its launchers (and runs its on_poll)
TAG = "OMNI_LAUNCH_TEST_TAG"
SCRIPTS = sorted([*(REPO_ROOT / "launch").glob("*.sh"), *(REPO_ROOT / "launch").glob("*.sbatch")])


# ----------------------------------------------------------------------------- running launchers
def _env(tag: str, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "LOCAL_SIZE", "MASTER_ADDR",
                        "MASTER_PORT", "NNODES", "NODE_RANK", "NPROC_PER_NODE", "MAX_RESTARTS", "HOSTFILE")
           and not k.startswith("TORCHELASTIC_")}
    env.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", PYTHON=sys.executable, **{TAG: tag})
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    env.update(extra)
    return env


def _tagged_processes(tag: str) -> dict[int, list[bytes]]:
    """{pid: its environment entries} of every live process whose environment carries `TAG=tag` (the launchers,
    torchrun's agents and workers, and their children)."""
    marker = f"{TAG}={tag}".encode()
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            environ = (entry / "environ").read_bytes().split(b"\0")
        except OSError:  # gone, or not ours
            continue
        if marker in environ:
            found[int(entry.name)] = environ
    return found


def _tagged_pids(tag: str) -> list[int]:
    return list(_tagged_processes(tag))


def _parent_pid(pid: int) -> int | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat.rpartition(")")[2].split()[1])  # the fields after "(comm)": state, ppid, ...


def _first_attempt_worker(tag: str, rank: int) -> int | None:
    """The pid of the torchrun worker process that runs global `rank` in the job's first attempt: a tagged process
    with RANK=rank and TORCHELASTIC_RESTART_COUNT=0 (torchrun's worker environment) whose parent is not one too
    (its children, e.g. data-loader workers, inherit that environment)."""
    wanted = {f"RANK={rank}".encode(), b"TORCHELASTIC_RESTART_COUNT=0"}
    workers = {pid for pid, environ in _tagged_processes(tag).items() if wanted <= set(environ)}
    roots = [pid for pid in workers if _parent_pid(pid) not in workers]
    return roots[0] if len(roots) == 1 else None


def _kill_tagged(tag: str) -> None:
    for _ in range(50):
        pids = _tagged_pids(tag)
        if not pids:
            return
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.1)


def run_launchers(commands: list[tuple[list[str], dict[str, str]]], logs: list[Path],
                  timeout_s: float = LAUNCH_TIMEOUT_S, on_poll: Callable[[], None] | None = None) -> list[int]:
    """Start every (command, env) at once, each in its own session with its output in a log file; wait for all,
    calling `on_poll` (if given) every POLL_S while any runs. A failed launcher gives the others FAILURE_GRACE_S to
    finish; a timeout fails the test. Whatever happens, every process of this run is killed on the way out.
    Returns the exit codes."""
    tag = commands[0][1][TAG]
    procs = []
    try:
        for (command, env), log in zip(commands, logs):
            with open(log, "wb") as out:
                procs.append(subprocess.Popen(command, cwd=REPO_ROOT, env=env, stdout=out, stderr=subprocess.STDOUT,
                                              start_new_session=True))
        deadline, failed_at = time.monotonic() + timeout_s, None
        while any(p.poll() is None for p in procs):
            if failed_at is None and any(p.returncode not in (None, 0) for p in procs):
                failed_at = time.monotonic()
            if failed_at is not None and time.monotonic() - failed_at > FAILURE_GRACE_S:
                break
            if time.monotonic() > deadline:
                pytest.fail(f"launchers timed out after {timeout_s:.0f} s:\n" + _tails(logs))
            if on_poll is not None:
                on_poll()
            time.sleep(POLL_S)
    finally:
        for proc in procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
        _kill_tagged(tag)
        for proc in procs:
            proc.wait(timeout=30)
    return [p.returncode for p in procs]


def _run(command: list[str], cwd: Path = REPO_ROOT, env: dict[str, str] | None = None):
    """A short command (script checks, stand-in runs) with its output captured."""
    return subprocess.run(command, cwd=cwd, env=env, check=False, capture_output=True, text=True, timeout=60)


def _tails(logs: list[Path], chars: int = 5000) -> str:
    return "\n".join(f"--- {log.name} ---\n{log.read_text(errors='replace')[-chars:]}" for log in logs)


def train_overrides(data: dict, output: Path) -> list[str]:
    return [RECIPE, f"run.output_dir={output}", f"model.tokenizer.bpe_from={data['manifest']}",
            f"data.sources.synth={data['shards']}", "data.samples_per_epoch=8", "train.log_every=1",
            "train.save_every=2", "train.keep_last=1", "train.timeout_s=120", SINGLE_STAGE]


def losses(output: Path, stage: str) -> tuple[dict[int, float], list[int]]:
    """{step: loss} (the last entry of a repeated step wins) and every step in the order it was logged."""
    entries = [json.loads(line) for line in (output / stage / "losses.jsonl").read_text().splitlines()]
    return {e["step"]: e["loss"] for e in entries}, [e["step"] for e in entries]


def _logged_steps(output: Path, stage: str) -> list[int]:
    """The steps rank 0 has logged so far, in order (whole lines only: rank 0 may be writing the last one)."""
    try:
        text = (output / stage / "losses.jsonl").read_text()
    except FileNotFoundError:
        return []
    return [json.loads(line)["step"] for line in text.split("\n")[:-1]]


class KillRankOnce:
    """Fault injection from outside the job (an `on_poll` of run_launchers): once rank 0 has logged step
    `after_step` of `stage`, and before `last_step`, SIGKILL the worker process of `rank` (first attempt only).

    The worker is frozen (SIGSTOP) first, until the stage folder stays unchanged for SETTLE_S: a frozen rank lets
    its peers run on only to their next collective with it, so `killed_after` (the last step logged) and
    `newest_checkpoint` (the newest committed checkpoint, which the restarted job must resume from) are exactly
    what the job held when the rank died. `missed` is the step already logged when it was too late."""

    SETTLE_S, SETTLE_MAX_S = 2.0, 20.0

    def __init__(self, tag: str, output: Path, stage: str, rank: int, after_step: int, last_step: int):
        self.tag, self.output, self.stage, self.rank = tag, output, stage, rank
        self.after_step, self.last_step = after_step, last_step
        self.killed_after: int | None = None
        self.newest_checkpoint: int | None = None
        self.missed: int | None = None

    def _stage_state(self) -> tuple[int, list[int]]:
        from omni_moe.training.checkpoint_store import CheckpointManager

        steps = _logged_steps(self.output, self.stage)
        root = self.output / self.stage / "checkpoints"
        return (steps[-1] if steps else 0), [step for step, _ in CheckpointManager(root).committed_steps()]

    def __call__(self) -> None:
        if self.killed_after is not None or self.missed is not None:
            return
        steps = _logged_steps(self.output, self.stage)
        if not steps or steps[-1] < self.after_step:
            return
        if steps[-1] >= self.last_step:
            self.missed = steps[-1]
            return
        pid = _first_attempt_worker(self.tag, self.rank)
        if pid is None:  # not found this time: try again at the next poll
            return
        os.kill(pid, signal.SIGSTOP)
        state, changed_at, deadline = self._stage_state(), time.monotonic(), time.monotonic() + self.SETTLE_MAX_S
        while time.monotonic() - changed_at < self.SETTLE_S and time.monotonic() < deadline:
            time.sleep(0.1)
            now = self._stage_state()
            if now != state:
                state, changed_at = now, time.monotonic()
        self.killed_after, committed = state
        self.newest_checkpoint = max(committed, default=None)
        os.kill(pid, signal.SIGKILL)


# ----------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict:
    return small_synth_shards(tmp_path_factory.mktemp("synth"))


@pytest.fixture(scope="module")
def two_node_run(data, tmp_path_factory) -> dict:
    """Two launch/torchrun.sh invocations, one per "node", rendezvousing over loopback."""
    from omni_moe.training.distributed import free_port

    output = tmp_path_factory.mktemp("two_nodes")
    tag, port = uuid.uuid4().hex, free_port()
    # run.nproc_per_node=1: the recipe's 2 per node would be refused against the launcher's 1 (LOCAL_WORLD_SIZE)
    commands = [(["bash", "launch/torchrun.sh", *train_overrides(data, output), "run.nproc_per_node=1"],
                 _env(tag, NNODES="2", NODE_RANK=str(node), NPROC_PER_NODE="1", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port)))
                for node in (0, 1)]
    logs = [output / f"node{node}.log" for node in (0, 1)]
    codes = run_launchers(commands, logs)
    return {"output": output, "codes": codes, "logs": logs}


# ----------------------------------------------------------------------------- tests
@pytest.mark.parametrize("script", SCRIPTS, ids=[s.name for s in SCRIPTS])
def test_launch_script_parses(script):
    """`bash -n` every launch script (and shellcheck where it is installed)."""
    result = _run(["bash", "-n", str(script)])
    assert result.returncode == 0, result.stderr
    if shutil.which("shellcheck"):
        result = _run(["shellcheck", "-s", "bash", str(script)])
        assert result.returncode == 0, result.stdout


def test_torchrun_script_rejects_a_bad_node_rank():
    result = _run(["bash", "launch/torchrun.sh", RECIPE], env=_env("unused", NNODES="2", NODE_RANK="2"))
    assert result.returncode == 2 and "NODE_RANK=2 must be below NNODES=2" in result.stderr, result.stderr


@pytest.mark.timeout(300)
def test_two_node_job_over_loopback_commits_one_consistent_checkpoint(two_node_run):
    from omni_moe.training.checkpoint_store import CheckpointManager

    output, logs = two_node_run["output"], two_node_run["logs"]
    assert two_node_run["codes"] == [0, 0], _tails(logs)
    root = output / "experts" / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == ["step-000012"], sorted(p.name for p in root.iterdir())
    checkpoint = root / "step-000012"
    manifest = CheckpointManager(root).verify(checkpoint, mode="full")  # sha256 of every file
    layout = json.loads((checkpoint / "training_layout.json").read_text())
    # one process per launcher, so a world of 2 spans both "nodes"; EP=2 puts one EP rank on each
    assert (layout["world_size"], layout["ep_size"], layout["step"]) == (2, 2, 12), layout
    assert set(layout["expert_files"]) == {"0", "1"} and set(layout["expert_files"].values()) <= set(manifest["files"])

    exported = load_file(str(output / "experts" / "model" / "model.safetensors"))
    by_tensor: dict[str, dict[int, torch.Tensor]] = {}
    for ep_rank, rel in layout["expert_files"].items():
        for key, value in load_file(str(checkpoint / rel)).items():
            name, _, global_id = key.rpartition(".expert.")
            assert int(global_id) % 2 == int(ep_rank), (key, ep_rank)  # global id g lives on EP rank g % 2
            by_tensor.setdefault(name, {})[int(global_id)] = value
    assert sorted(by_tensor) == sorted(k for k in exported if ".experts." in k), sorted(by_tensor)
    for name, experts in by_tensor.items():
        assert sorted(experts) == list(range(10)), (name, sorted(experts))  # every expert from both EP ranks
        for global_id, value in experts.items():  # and the exported model holds the same rows
            assert torch.equal(exported[name][global_id], value), (name, global_id)
    by_step, _ = losses(output, "experts")
    assert sorted(by_step) == list(range(1, 13)) and by_step[12] < by_step[1], by_step


@pytest.mark.timeout(RESTART_TIMEOUT_S + LAUNCH_TIMEOUT_S + 60)  # + the two-node reference, when it runs first here
def test_sigkill_of_a_rank_restarts_from_the_last_checkpoint_and_matches(data, two_node_run, tmp_path):
    """Checkpoints every 2 steps; rank 1's process is SIGKILLed from outside once step 7 of 12 is logged;
    torchrun (max 1 restart) restarts both ranks, which resume from the newest committed checkpoint -> the same
    losses and final weights as the uninterrupted run."""
    from omni_moe.training.distributed import free_port

    assert two_node_run["codes"] == [0, 0], _tails(two_node_run["logs"])
    log = tmp_path / "torchrun.log"
    tag = uuid.uuid4().hex
    env = _env(tag, NPROC_PER_NODE="2", MAX_RESTARTS="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    killer = KillRankOnce(tag, tmp_path, "experts", rank=1, after_step=7, last_step=12)
    codes = run_launchers([(["bash", "launch/torchrun.sh", *train_overrides(data, tmp_path)], env)], [log],
                          timeout_s=RESTART_TIMEOUT_S, on_poll=killer)
    text = log.read_text(errors="replace")
    assert killer.missed is None, f"the stage had logged step {killer.missed} before rank 1 could be killed"
    assert killer.killed_after is not None, "rank 1's worker process was never found:\n" + text[-5000:]
    assert codes == [0], _tails([log])
    killed_after, resumed = killer.killed_after, killer.newest_checkpoint
    # step 7 was logged, so checkpoint 6 was committed; the restart resumes from the newest one, not the last step
    assert resumed is not None and resumed % 2 == 0 and 6 <= resumed <= killed_after < 12, (resumed, killed_after)
    assert "resumed from" in text and f"step-{resumed:06d} at step {resumed}" in text, text[-5000:]

    got, order = losses(tmp_path, "experts")
    want, _ = losses(two_node_run["output"], "experts")
    # the first attempt logged 1..killed_after, the restarted job resumed+1..12
    assert order == list(range(1, killed_after + 1)) + list(range(resumed + 1, 13)), (order, killed_after, resumed)
    assert got == want
    reference = load_file(str(two_node_run["output"] / "experts" / "model" / "model.safetensors"))
    weights = load_file(str(tmp_path / "experts" / "model" / "model.safetensors"))
    assert weights.keys() == reference.keys()
    unequal = [k for k in reference if not torch.equal(reference[k], weights[k])]
    assert not unequal, unequal[:5]


def test_restarted_rank_refuses_a_shared_agent_store(monkeypatch):
    """Without TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 a restarted rank would reuse torchrun's store (stale peer
    addresses): init_distributed raises at once, naming the fix, instead of hanging in connectFullMesh."""
    from omni_moe.training.distributed import SHARED_STORE_SWITCH, check_restartable_store

    monkeypatch.setenv("TORCHELASTIC_USE_AGENT_STORE", "True")
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")
    with pytest.raises(RuntimeError, match=f"{SHARED_STORE_SWITCH}=1"):
        check_restartable_store(rank=0)
    monkeypatch.setenv("TORCHELASTIC_USE_AGENT_STORE", "False")  # what launch/torchrun.sh's switch gives the ranks
    check_restartable_store(rank=0)


def test_slurm_script_gives_every_node_the_head_node_and_its_rank(tmp_path):
    """launch/slurm.sbatch inside a (simulated) 2-node allocation: MASTER_ADDR is the first host of `scontrol show
    hostnames`, not localhost, and each node's torchrun gets --node-rank=SLURM_NODEID and the c10d endpoint."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    record = tmp_path / "torchrun_calls"
    (bin_dir / "scontrol").write_text('#!/bin/sh\n[ "$1 $2" = "show hostnames" ] && printf "gpu-a17\\ngpu-b03\\n"\n')
    # srun: run the task once per node with that node's SLURM_NODEID, as SLURM would (on one machine here)
    (bin_dir / "srun").write_text('#!/usr/bin/env bash\nwhile [[ "$1" == --* ]]; do shift; done\n'
                                  'for id in $(seq 0 $((SLURM_JOB_NUM_NODES - 1))); do\n'
                                  '  SLURM_NODEID=$id "$@" || exit\ndone\n')
    # the interpreter: answer torchrun.sh's CUDA probe, record the torchrun command line
    (bin_dir / "python").write_text(f'#!/usr/bin/env bash\n[ "$1" = "-c" ] && exit 1\n'
                                    f'echo "MASTER_ADDR=$MASTER_ADDR $*" >> {record}\n')
    for stub in bin_dir.iterdir():
        stub.chmod(0o755)
    env = _env("unused", PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}", PYTHON="python", SLURM_JOB_ID="4242",
               SLURM_JOB_NODELIST="gpu-a17,gpu-b03", SLURM_JOB_NUM_NODES="2", SLURM_GPUS_ON_NODE="8",
               SLURM_SUBMIT_DIR=str(REPO_ROOT))
    sbatch_script = str(REPO_ROOT / "launch" / "slurm.sbatch")  # run from elsewhere: it must cd to the repository
    result = _run(["bash", sbatch_script, "recipes/real_scale.yaml", "train.save_every=200"], cwd=tmp_path, env=env)
    assert result.returncode == 0, result.stderr
    calls = record.read_text().splitlines()
    assert len(calls) == 2, calls
    for node, call in enumerate(calls):
        assert call.startswith("MASTER_ADDR=gpu-a17 -m torch.distributed.run "), call
        for arg in ("--nnodes=2", f"--node-rank={node}", "--nproc-per-node=8", "--rdzv-backend=c10d",
                    "--rdzv-endpoint=gpu-a17:24242", "--rdzv-id=omni-4242", "--max-restarts=1",
                    "-m omni.cli train recipes/real_scale.yaml train.save_every=200"):
            assert arg in call, (arg, call)
        assert "localhost" not in call and "127.0.0.1" not in call


@pytest.mark.timeout(180)
def test_deepspeed_hostfile_script_starts_one_rank_per_slot(tmp_path):
    """launch/deepspeed_hostfile.sh with `localhost slots=2` on this CPU machine: the real DeepSpeed launcher starts
    2 ranks (--num_gpus from the slots) of `omni train RECIPE --dry-run`; a malformed hostfile line is refused."""
    from omni_moe.training.distributed import free_port

    hostfile = tmp_path / "hostfile"
    hostfile.write_text("# one CPU host\nlocalhost slots=2\n")
    log = tmp_path / "deepspeed.log"
    env = _env(uuid.uuid4().hex, HOSTFILE=str(hostfile), MASTER_PORT=str(free_port()))
    codes = run_launchers([(["bash", "launch/deepspeed_hostfile.sh", RECIPE, "--dry-run"], env)], [log],
                          timeout_s=150)
    text = log.read_text(errors="replace")
    assert codes == [0], text[-5000:]
    assert "dist_world_size=2" in text, text[-5000:]
    assert text.count("parameters: total") == 2, text[-5000:]  # one dry-run report per rank

    hostfile.write_text("localhost 2\n")
    result = _run(["bash", "launch/deepspeed_hostfile.sh", RECIPE], env=_env("unused", HOSTFILE=str(hostfile)))
    assert result.returncode == 2 and "line 1: expected 'host slots=N'" in result.stderr, result.stderr
