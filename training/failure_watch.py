"""One rank's failure ends every rank within seconds, with its cause.

Collectives cannot carry a failure everywhere: a rank that raises in its forward pass, its data loading or inside
DeepSpeed's `save_checkpoint` (a full disk) leaves its peers blocked in their next collective (an expert all-to-all,
a DeepSpeed barrier) until the process-group timeout, 30 minutes by default. So every rank of a training stage runs
a `PeerFailureWatch`:

    with PeerFailureWatch():      # training/loop.py wraps each stage in it
        ... train ...

A rank whose stage raises writes "rank R: Type: message" under one key of the job's rendezvous store (the c10d
store every rank already shares) before the exception goes on -- unless the exception is marked
`raised_on_every_rank` (a failure the ranks agreed on, which every rank raises by itself). A daemon thread in
every other rank polls that key and, once it appears, prints the cause and ends its process (exit code 1),
wherever its main thread is blocked.
torchrun then sees failed workers and stops the job, as it does for any rank that exits with an error. The first
failure written wins; a one-process job has no peer and runs no thread.
"""

from __future__ import annotations

import logging
import os
import sys
import threading

import torch.distributed as dist

from .distributed import remove_deepspeed_shm_buffers

logger = logging.getLogger(__name__)

FAILURE_KEY = "omni/failed_rank"
# set on an exception (or its class) that every rank raises at the same point (a failure the ranks agreed on, e.g.
# through an all-reduce): nothing to tell the peers, which would be ended before they could raise it themselves
RAISED_ON_EVERY_RANK = "raised_on_every_rank"
POLL_INTERVAL_S = 0.5
EXIT_CODE = 1


def _job_store():
    """The store of the default process group (None without one). torch offers no public getter for it."""
    if not dist.is_initialized() or dist.get_world_size() < 2:
        return None
    from torch.distributed import distributed_c10d

    return distributed_c10d._get_default_store()


class PeerFailureWatch:
    """See the module docstring. `poll_interval_s`: how often the other ranks look for a failure."""

    def __init__(self, poll_interval_s: float = POLL_INTERVAL_S):
        self.poll_interval_s = poll_interval_s
        self.store = _job_store()
        # per torchrun attempt: a restarted job must not read the failure that ended the previous attempt
        self.key = f"{FAILURE_KEY}/attempt-{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}"
        self.rank = dist.get_rank() if self.store is not None else 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> PeerFailureWatch:
        if self.store is not None:
            self._thread = threading.Thread(target=self._watch, name="omni-peer-failure-watch", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, exc_type, exc, traceback) -> None:
        if exc is not None and not getattr(exc, RAISED_ON_EVERY_RANK, False):
            self.report(exc)
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5 * self.poll_interval_s)

    def report(self, exc: BaseException) -> None:
        """Tell every other rank that this one failed, and why (the first report of the job is kept)."""
        if self.store is None:
            return
        cause = f"rank {self.rank}: {type(exc).__name__}: {exc}"
        try:
            self.store.compare_set(self.key, "", cause)  # set only if no rank reported first
        except Exception as err:  # the store may be gone (its host died): the exception goes on regardless
            logger.warning("could not report this rank's failure to its peers: %s", err)

    def _watch(self) -> None:
        while not self._stop.wait(self.poll_interval_s):
            try:
                if not self.store.check([self.key]):
                    continue
                cause = self.store.get(self.key).decode("utf-8", "replace")
            except Exception:  # the store went away (the job is ending): nothing left to watch
                return
            if cause.startswith(f"rank {self.rank}:") or self._stop.is_set():
                return  # our own failure: the main thread is raising it
            # print, not the logger: the process ends on the next line, whatever logging is configured
            print(f"rank {self.rank}: ending this rank because {cause}", file=sys.stderr, flush=True)
            remove_deepspeed_shm_buffers()
            os._exit(EXIT_CODE)


def raised_on_every_rank(exc: BaseException) -> BaseException:
    """Mark `exc` as raised by every rank at the same point (see RAISED_ON_EVERY_RANK); returns it."""
    setattr(exc, RAISED_ON_EVERY_RANK, True)
    return exc


__all__ = ["EXIT_CODE", "FAILURE_KEY", "RAISED_ON_EVERY_RANK", "PeerFailureWatch", "raised_on_every_rank"]
