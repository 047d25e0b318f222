"""Collectives that keep ranks on the same branch: one rank's JSON value on every rank, and a failure anywhere
raised on every rank.

A rank that fails alone and raises while its peers carry on leaves them waiting in their next collective until the
process-group timeout, so checkpoint saving and loading (training/engine_checkpoint.py, training/deepspeed_state.py)
agree on failures before they go on. Without a process group of 2+ ranks no collective runs.
"""

from __future__ import annotations

import json
from typing import Any

import torch
import torch.distributed as dist

from .failure_watch import raised_on_every_rank


def comm_device() -> torch.device:
    if dist.is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def broadcast_json(payload: Any, source: int) -> Any:
    """Collective: `payload` (JSON-able) of rank `source`, on every rank."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return payload
    rank, device = dist.get_rank(), comm_device()
    data = json.dumps(payload).encode() if rank == source else b""
    length = torch.tensor([len(data)], dtype=torch.int64, device=device)
    dist.broadcast(length, src=source)
    buffer = torch.empty(int(length.item()), dtype=torch.uint8, device=device)
    if rank == source:
        buffer.copy_(torch.frombuffer(bytearray(data), dtype=torch.uint8))
    dist.broadcast(buffer, src=source)
    return json.loads(bytes(buffer.cpu().tolist()).decode())


def first_failure(payload: dict | None) -> tuple[int, dict] | None:
    """Collective: every rank passes its failure (a JSON-able dict) or None; every rank gets the lowest failing
    rank's (rank, payload), or None. Ranks must take the same branch after a failure anywhere, or the ones that
    carry on would wait in their next collective until the process-group timeout."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return None if payload is None else (0, payload)
    rank, world = dist.get_rank(), dist.get_world_size()
    flag = torch.tensor([rank if payload is not None else world], dtype=torch.int64, device=comm_device())
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    source = int(flag.item())
    return None if source == world else (source, broadcast_json(payload, source))


def raise_if_any_rank_failed(error: BaseException | None, what: str,
                             error_types: tuple[type[Exception], ...] = ()) -> None:
    """Collective: every rank passes its error or None; if any rank failed, every rank raises the lowest failing
    rank's error -- as the type of `error_types` with the same name, else as RuntimeError -- naming `what`, the
    rank, and the original type and message."""
    failure = first_failure(None if error is None else {"type": type(error).__name__, "message": str(error)})
    if failure is None:
        return
    source, payload = failure
    exc_type = {t.__name__: t for t in error_types}.get(payload["type"], RuntimeError)
    message = f"{what} failed on rank {source}: {payload['type']}: {payload['message']}"
    raise raised_on_every_rank(exc_type(message)) from error


__all__ = ["broadcast_json", "comm_device", "first_failure", "raise_if_any_rank_failed"]
