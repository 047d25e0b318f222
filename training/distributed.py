"""Process-group helpers: initialise from torchrun / deepspeed-launcher / plain env vars, seed every rank, tear down.

One process per rank. `init_distributed` reads the standard variables (`RANK`, `WORLD_SIZE`, `LOCAL_RANK`,
`MASTER_ADDR`, `MASTER_PORT`) that torchrun, the deepspeed launcher and SLURM wrappers set; without them it starts a
one-process group on loopback, so the same training code runs as a single process (DeepSpeed's engine always wants a
process group). Backend: NCCL when CUDA is available, gloo otherwise.

Every process group gets a finite timeout: with gloo, a rank that issues fewer collectives than the others (an error
path, a skipped empty expert) blocks its peers until that timeout, so a short one turns a hang into an error.

torchrun restarts (`--max-restarts`) need a fresh rendezvous store per attempt: `check_restartable_store` explains why
and refuses a restarted attempt that would reuse the old one.
"""

from __future__ import annotations

import contextlib
import logging
import os
import random
import socket
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

DEFAULT_TIMEOUT_S = 1800.0


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    backend: str

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def free_port() -> int:
    """A TCP port that was free a moment ago on loopback (bind to port 0, read it back, release it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def default_backend() -> str:
    return "nccl" if torch.cuda.is_available() else "gloo"


def _env_int(name: str) -> int | None:
    value = os.environ.get(name)
    if value is None or value == "":
        return None
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name}={value!r} is not an integer") from None


def init_distributed(
    timeout_s: float = DEFAULT_TIMEOUT_S,
    backend: str | None = None,
    deepspeed_comm: bool = True,
) -> DistInfo:
    """Join (or create) the default process group and return this rank's `DistInfo`.

    - Launched by torchrun / the deepspeed launcher / SLURM + torchrun: uses their env vars.
    - No `WORLD_SIZE` in the environment: a one-process group with an in-memory store (nothing listens on the
      network but gloo's socket, bound to loopback). Multi-process jobs rendezvous over MASTER_ADDR:MASTER_PORT,
      whose TCPStore listens on every interface: run them on a private network (docs/launch.md).
    - `deepspeed_comm`: also hand the group to `deepspeed.comm`, which DeepSpeed's engine and its expert-parallel
      group helpers use. On CPU this JIT-compiles DeepSpeed's shared-memory op the first time (30-45 s, cached in the
      torch extensions directory); plain torch code (tests of the dispatcher) can skip it.

    Idempotent: a second call returns the existing group's info.
    """
    if timeout_s <= 0:
        raise ValueError(f"init_distributed: timeout_s must be positive, got {timeout_s}")
    backend = backend or default_backend()
    if not dist.is_initialized():
        world_size = _env_int("WORLD_SIZE")
        store = pg_options = None
        if world_size is None:
            # single process: fill in what DeepSpeed expects (its shared-memory buffers are named after MASTER_ADDR
            # and MASTER_PORT), but keep the rendezvous in memory: env:// would start a TCPStore listening on
            # every interface for a job that has no peer
            os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
            os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
            os.environ.setdefault("MASTER_PORT", str(free_port()))
            world_size = 1
            store = dist.HashStore()
            if backend == "gloo":  # gloo listens for peers on the address the hostname resolves to: loopback
                pg_options = dist.ProcessGroupGloo._Options()
                pg_options._devices = [dist.ProcessGroupGloo.create_device(hostname="127.0.0.1")]
        rank = _env_int("RANK")
        if rank is None:
            raise ValueError("init_distributed: WORLD_SIZE is set but RANK is not; launch with torchrun or set both")
        for name in ("MASTER_ADDR", "MASTER_PORT"):
            if not os.environ.get(name):
                raise ValueError(f"init_distributed: {name} is not set (torchrun and the deepspeed launcher set it)")
        local_rank = _env_int("LOCAL_RANK")
        os.environ.setdefault("LOCAL_RANK", str(rank if local_rank is None else local_rank))
        check_restartable_store(rank)
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
        dist.init_process_group(
            backend=backend, rank=rank, world_size=world_size, timeout=timedelta(seconds=timeout_s), store=store,
            pg_options=pg_options,
        )
    if deepspeed_comm:
        import deepspeed

        # Wraps the existing torch group (DeepSpeed short-circuits when torch.distributed is initialised).
        deepspeed.init_distributed(
            dist_backend=dist.get_backend(), timeout=timedelta(seconds=timeout_s), auto_mpi_discovery=False,
            verbose=False,
        )
    return dist_info()


SHARED_STORE_SWITCH = "TORCH_DISABLE_SHARE_RDZV_TCP_STORE"


def check_restartable_store(rank: int = 0) -> None:
    """Fail fast where a torchrun restart cannot rendezvous, instead of hanging until the process-group timeout.

    torchrun's agent lends the ranks its own TCPStore (it sets TORCHELASTIC_USE_AGENT_STORE=True) and keeps that
    store across restarts. Restarted ranks create their process groups under the same store keys as the dead ones
    (group names restart from 0 in every process), so a rank may read a dead peer's gloo/NCCL address before the
    peer's new incarnation overwrote it, and connectFullMesh then times out (measured with a plain torch script:
    2 of 4 restarts with a c10d endpoint, 4 of 4 with --standalone; docs/launch.md). With
    TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 in torchrun's environment (launch/torchrun.sh sets it) every rendezvous
    round publishes a fresh MASTER_PORT and rank 0 hosts a new, empty store. Raises on a restarted attempt with the
    shared store; warns (rank 0) on a first attempt that could be restarted."""
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return
    attempt = _env_int("TORCHELASTIC_RESTART_COUNT") or 0
    if attempt > 0:
        raise RuntimeError(
            f"init_distributed: torchrun restarted this job (TORCHELASTIC_RESTART_COUNT={attempt}) but lends the "
            f"ranks its TCPStore, which still holds the dead ranks' process-group addresses: the restarted groups "
            f"would time out connecting to them. Launch with {SHARED_STORE_SWITCH}=1 in torchrun's environment "
            f"(launch/torchrun.sh does) so that every restart gets a fresh store.")
    if rank == 0 and (_env_int("TORCHELASTIC_MAX_RESTARTS") or 0) > 0:
        logging.getLogger(__name__).warning(
            "torchrun may restart this job (TORCHELASTIC_MAX_RESTARTS=%s) but shares its TCPStore with the ranks: a "
            "restart would fail. Set %s=1 in torchrun's environment (launch/torchrun.sh does).",
            os.environ.get("TORCHELASTIC_MAX_RESTARTS"), SHARED_STORE_SWITCH)


def dist_info() -> DistInfo:
    if not dist.is_initialized():
        return DistInfo(rank=0, world_size=1, local_rank=0, backend="none")
    return DistInfo(
        rank=dist.get_rank(),
        world_size=dist.get_world_size(),
        local_rank=int(os.environ.get("LOCAL_RANK", dist.get_rank())),
        backend=str(dist.get_backend()),
    )


def get_rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def get_world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def barrier() -> None:
    """`dist.barrier()` in a distributed job; nothing in a single process."""
    if dist.is_initialized():
        dist.barrier()


def is_main_process() -> bool:
    return get_rank() == 0


def seed_everything(seed: int, rank_offset: bool = True) -> int:
    """Seed Python, NumPy and torch; with `rank_offset` each rank gets `seed + rank` (different dropout/noise per
    rank, reproducible per rank). Model initialisation should use the plain seed on every rank (DeepSpeed also
    broadcasts dense weights from rank 0 at init). Returns the seed used."""
    used = seed + (get_rank() if rank_offset else 0)
    random.seed(used)
    np.random.seed(used % (2**32))
    torch.manual_seed(used)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(used)
    return used


def set_cpu_threads_per_rank(total_cores: int | None = None) -> int:
    """Give each local rank its share of the cores (at least 1): several ranks each using every core thrash
    (measured: 2 ranks on 2 cores ran ~10x faster with OMP_NUM_THREADS=1). Respects an explicit OMP_NUM_THREADS."""
    if os.environ.get("OMP_NUM_THREADS"):
        threads = max(1, int(os.environ["OMP_NUM_THREADS"]))
    else:
        cores = total_cores or os.cpu_count() or 1
        local_size = _env_int("LOCAL_WORLD_SIZE") or _env_int("LOCAL_SIZE") or get_world_size()
        threads = max(1, cores // max(1, local_size))
    torch.set_num_threads(threads)
    return threads


def teardown() -> None:
    """`barrier()` then `destroy_process_group()`: without it spawned workers sometimes die with SIGABRT at exit
    ("terminate called without an active exception") while gloo threads are still alive."""
    if not dist.is_initialized():
        return
    try:
        dist.barrier()
    finally:
        dist.destroy_process_group()
        remove_deepspeed_shm_buffers()


def broadcast_text(text: str, src: int = 0) -> str:
    """Rank `src`'s `text` on every rank (length, then UTF-8 bytes: two broadcasts, no pickle); `text` itself
    without a process group."""
    if not dist.is_initialized():
        return text
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    data = text.encode("utf-8") if dist.get_rank() == src else b""
    length = torch.tensor([len(data)], dtype=torch.long, device=device)
    dist.broadcast(length, src=src)
    payload = torch.zeros(int(length.item()), dtype=torch.uint8, device=device)
    if payload.numel():
        if dist.get_rank() == src:
            payload.copy_(torch.frombuffer(bytearray(data), dtype=torch.uint8))
        dist.broadcast(payload, src=src)
    return bytes(payload.cpu().tolist()).decode("utf-8")


def remove_deepspeed_shm_buffers() -> int:
    """Unlink this job's DeepSpeed shared-memory all-reduce buffers (/dev/shm, ~66 MB per rank).

    DeepSpeed's CPU comm op creates them when LOCAL_SIZE equals the world size (its own launcher sets it; torchrun
    does not) and never unlinks them: a machine that runs many jobs or tests fills its RAM-backed /dev/shm. The names
    carry MASTER_ADDR and MASTER_PORT, so only this job's buffers are touched. Returns how many were removed."""
    addr, port = os.environ.get("MASTER_ADDR"), os.environ.get("MASTER_PORT")
    if not addr or not port:
        return 0
    removed = 0
    for path in Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{addr}_{port}_*"):
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
            removed += 1
    return removed


__all__ = [
    "DEFAULT_TIMEOUT_S",
    "SHARED_STORE_SWITCH",
    "DistInfo",
    "broadcast_text",
    "check_restartable_store",
    "default_backend",
    "dist_info",
    "free_port",
    "get_rank",
    "get_world_size",
    "init_distributed",
    "is_main_process",
    "seed_everything",
    "set_cpu_threads_per_rank",
    "teardown",
]
