"""One run per output folder: an exclusive `fcntl.flock` on OUTPUT/.omni-run.lock for the whole run.

Two runs writing one output folder corrupt each other (one's checkpoint `begin` removes the other's staging folder,
one's pruning deletes the other's checkpoints). So the process that starts a run takes the lock before it writes
anything and holds it until it exits; the lock file names the holder (host, pid, run id, start time), and a second
run fails at once with a message naming it. The kernel drops a flock when its holder dies, so a crashed run never
leaves a stale lock behind (the file stays; only the lock matters).

`omni train` takes the lock in the launching process and hands its run id to the ranks it starts (torchrun) through
OMNI_RUN_ID; rank 0 then sees the lock held by that run id and goes on. Launched directly (torchrun on every node),
rank 0 takes the lock itself. flock is advisory and per host: every run must go through `omni train`, and on a
network filesystem it protects only as far as that filesystem implements flock.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time
import uuid
from pathlib import Path

LOCK_FILE = ".omni-run.lock"
RUN_ID_ENV = "OMNI_RUN_ID"


class RunLockHeld(RuntimeError):
    """Another run holds the output folder."""


def new_run_id() -> str:
    return uuid.uuid4().hex[:12]


def read_holder(folder: str | Path) -> dict:
    """What the lock file of `folder` says about its holder ({} when absent or unreadable)."""
    try:
        return json.loads((Path(folder) / LOCK_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


def describe_holder(holder: dict) -> str:
    if not holder:
        return "an unknown process (the lock file names no holder)"
    return (f"host {holder.get('host', '?')} pid {holder.get('pid', '?')} (run {holder.get('run_id', '?')}, "
            f"started {holder.get('started', '?')})")


class RunLock:
    """The exclusive lock on `folder` (created if missing). `acquire` raises RunLockHeld naming the holder."""

    def __init__(self, folder: str | Path, run_id: str | None = None):
        self.folder = Path(folder)
        self.path = self.folder / LOCK_FILE
        self.run_id = run_id or new_run_id()
        self._handle = None

    @property
    def held(self) -> bool:
        return self._handle is not None

    def acquire(self) -> RunLock:
        self.folder.mkdir(parents=True, exist_ok=True)
        handle = open(self.path, "a+", encoding="utf-8")  # never truncate before holding the lock
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.close()
            raise RunLockHeld(f"{self.folder} is in use by another run: {describe_holder(read_holder(self.folder))}; "
                              f"wait for it to finish or choose another run.output_dir (lock: {self.path})") from None
        handle.seek(0)
        handle.truncate()
        handle.write(json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "run_id": self.run_id,
                                 "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}) + "\n")
        handle.flush()
        self._handle = handle
        return self

    def release(self) -> None:
        if self._handle is not None:
            fcntl.flock(self._handle.fileno(), fcntl.LOCK_UN)
            self._handle.close()
            self._handle = None

    def __enter__(self) -> RunLock:
        return self.acquire() if not self.held else self

    def __exit__(self, *exc) -> None:
        self.release()


def held_by_run(folder: str | Path, run_id: str | None) -> bool:
    """True when `folder`'s lock is held right now by the run `run_id` (our launching process)."""
    if not run_id or read_holder(folder).get("run_id") != run_id:
        return False
    probe = RunLock(folder)
    try:
        probe.acquire()
    except RunLockHeld:
        return True  # locked, and the file names our run: the launcher holds it
    probe.release()  # nobody held it: the file was a leftover of our run id (never the case in practice)
    return False


__all__ = ["LOCK_FILE", "RUN_ID_ENV", "RunLock", "RunLockHeld", "describe_holder", "held_by_run", "new_run_id",
           "read_holder"]
