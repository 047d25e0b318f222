"""Checkpoints that lose nothing: a staged, checksummed, atomically published folder per step.

Layout under `root`: `step-000012/` (published: `rank-NNNNN/` per-rank files, shared files written by rank 0,
`metadata.json`, `manifest.json` with every file's size and sha256, and `COMMITTED`, written LAST, holding the sha256
of manifest.json); `.staging-[RUNID-]step-000012/` (being written; RUNID: the run writing it, training/run_lock.py)
and `.deleting-*` (being pruned) are never loaded.

Protocol (`begin` -> every rank writes under `ckpt.path` -> `commit`): in `commit`, after a barrier each rank hashes
the files it owns (those under its `rank-NNNNN/`; rank 0 owns everything else) into a per-rank manifest and fsyncs
them; after a second barrier rank 0 merges the manifests (refusing a folder with files nobody hashed), writes
`manifest.json`, renames the staging folder to `step-NNNNNN`, writes `COMMITTED`, prunes to `keep_last`; a third
barrier ends it. A crash anywhere before `COMMITTED` leaves a folder that `latest_valid` skips and the next `begin`
deletes. Every rank issues the same barriers whatever fails (a rank that skips one would hang its peers), and every
rank raises if the checkpoint did not end up published.

Assumes `root` is a filesystem every rank sees (local disk for one node, a shared filesystem for several), and one
job per `root`. What goes inside a step folder is the writer's business (training/engine_checkpoint.py for a training
run); the file formats are those of training/checkpoint_files.py, none of which unpickles.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

from .checkpoint_files import fsync_dir, read_json, sha256_file, write_json

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
COMMITTED = "COMMITTED"
MANIFEST = "manifest.json"
METADATA = "metadata.json"
STAGING_PREFIX = ".staging-"
DELETING_PREFIX = ".deleting-"
_PARTIAL_MANIFEST = ".manifest-rank-{rank:05d}.json"
_PARTIAL_MANIFEST_RE = re.compile(r"^\.manifest-rank-\d+\.json$")
_STEP_DIR_RE = re.compile(r"^step-(\d+)$")
_RANK_DIR_RE = re.compile(r"^rank-(\d+)$")
VERIFY_MODES = ("full", "sizes")


class CheckpointIntegrityError(RuntimeError):
    """A checkpoint folder that must not be loaded: `file` (relative to `path`) is missing or does not match."""

    def __init__(self, path: str | os.PathLike, file: str, reason: str):
        self.path, self.file, self.reason = Path(path), file, reason
        super().__init__(f"checkpoint {self.path}: {file}: {reason}")


class CheckpointCommitError(RuntimeError):
    """`commit` did not publish the checkpoint (the previous checkpoints are untouched)."""


def step_dir_name(step: int) -> str:
    return f"step-{step:06d}"


@dataclass(frozen=True)
class StagedCheckpoint:
    """A checkpoint being written: every rank writes under `path`; `commit` publishes it as `final_path`."""

    step: int
    path: Path
    final_path: Path
    rank: int

    @property
    def rank_dir(self) -> Path:
        """This rank's own folder (created on first use); files here are hashed by this rank."""
        folder = self.path / f"rank-{self.rank:05d}"
        folder.mkdir(exist_ok=True)
        return folder


class CheckpointManager:
    """Stage, commit, verify, find and prune checkpoints under `root` (see the module docstring for the protocol).

    Every rank constructs one with its `rank`/`world_size` and calls `begin` and `commit` together; `barrier` is
    `torch.distributed.barrier` (or a no-op for one process). `verify_on_load` is the default mode of
    `latest_valid`: "full" (sha256 of every byte) or "sizes" (cheap: catches truncation and missing files only)."""

    def __init__(self, root: str | os.PathLike, keep_last: int | None = 3, rank: int = 0, world_size: int = 1,
                 barrier: Callable[[], Any] | None = None, verify_on_load: str = "full", run_id: str = ""):
        if keep_last is not None and keep_last < 1:
            raise ValueError(f"CheckpointManager: keep_last must be >= 1 or None (keep all), got {keep_last}")
        if not 0 <= rank < world_size:
            raise ValueError(f"CheckpointManager: rank {rank} is outside world_size {world_size}")
        if world_size > 1 and barrier is None:
            raise ValueError("CheckpointManager: world_size > 1 needs a barrier (e.g. torch.distributed.barrier)")
        if verify_on_load not in VERIFY_MODES:
            raise ValueError(f"CheckpointManager: verify_on_load must be one of {VERIFY_MODES}, got {verify_on_load!r}")
        self.root = Path(root)
        self.keep_last, self.rank, self.world_size = keep_last, rank, world_size
        self.verify_on_load = verify_on_load
        if run_id and not re.fullmatch(r"[A-Za-z0-9_-]+", run_id):
            raise ValueError(f"CheckpointManager: run_id must be letters, digits, '_' or '-', got {run_id!r}")
        self.run_id = run_id  # in staging names: two writers never share a staging folder
        self._barrier = barrier or (lambda: None)

    # ---------------------------------------------------------------- writing
    def begin(self, step: int) -> StagedCheckpoint:
        """Rank 0 deletes leftovers of crashed writes and creates a fresh staging folder; all ranks then get it."""
        if step < 0:
            raise ValueError(f"CheckpointManager.begin: step must be >= 0, got {step}")
        staging = self.root / f"{STAGING_PREFIX}{self.run_id + '-' if self.run_id else ''}{step_dir_name(step)}"
        if self.rank == 0:
            self.root.mkdir(parents=True, exist_ok=True)
            self._remove_leftovers()
            staging.mkdir()
            fsync_dir(self.root)
        self._barrier()
        if not staging.is_dir():
            raise CheckpointCommitError(
                f"rank {self.rank}: staging folder {staging} made by rank 0 is not visible here; "
                "checkpoint roots must be on a filesystem every rank shares"
            )
        return StagedCheckpoint(step=step, path=staging, final_path=self.root / step_dir_name(step), rank=self.rank)

    def commit(self, ckpt: StagedCheckpoint, metadata: Mapping[str, Any] | None = None) -> Path:
        """Publish `ckpt` (collective: every rank calls it once it has written its files). Returns the final path.

        Raises CheckpointCommitError on every rank if the checkpoint was not published."""
        errors: list[BaseException] = []
        self._barrier()  # every rank has finished writing
        try:
            if self.rank == 0:
                for reserved in (MANIFEST, COMMITTED):
                    if (ckpt.path / reserved).exists():
                        raise CheckpointCommitError(f"{ckpt.path}: {reserved} is a reserved name; do not write it")
                write_json(ckpt.path / METADATA, {
                    "step": ckpt.step, "world_size": self.world_size, "created_unix": time.time(),
                    "format_version": FORMAT_VERSION, "user": dict(metadata or {}),
                })
            # rank 0 walks the whole folder (it owns the shared files); other ranks only their own rank-NNNNN/
            candidates = self._list_files(ckpt.path if self.rank == 0 else ckpt.path / f"rank-{self.rank:05d}")
            if self.rank != 0:
                candidates = [f"rank-{self.rank:05d}/{rel}" for rel in candidates]
            owned = {
                rel: {"size": (ckpt.path / rel).stat().st_size, "sha256": sha256_file(ckpt.path / rel, fsync=True)}
                for rel in candidates if self._owner(rel) == self.rank
            }
            write_json(ckpt.path / _PARTIAL_MANIFEST.format(rank=self.rank), {"rank": self.rank, "files": owned})
        except Exception as err:  # keep issuing the barriers: a rank that stops would hang the others
            logger.error("checkpoint step %d: rank %d could not hash its files: %s", ckpt.step, self.rank, err)
            errors.append(err)
        self._barrier()  # every per-rank manifest is on disk
        if self.rank == 0 and not errors:
            try:
                self._publish(ckpt)
            except Exception as err:
                logger.error("checkpoint step %d: not published: %s", ckpt.step, err)
                errors.append(err)
        self._barrier()  # rank 0 has published (or failed)
        if errors:
            raise CheckpointCommitError(f"checkpoint step {ckpt.step} was not committed: {errors[0]}") from errors[0]
        if ckpt.path.exists() or not (ckpt.final_path / COMMITTED).is_file():
            raise CheckpointCommitError(f"checkpoint step {ckpt.step}: rank 0 did not publish {ckpt.final_path}")
        return ckpt.final_path

    def _publish(self, ckpt: StagedCheckpoint) -> None:
        """Rank 0: merge per-rank manifests, write manifest.json, rename into place, write COMMITTED, prune."""
        files: dict[str, dict[str, Any]] = {}
        for rank in range(self.world_size):
            partial_path = ckpt.path / _PARTIAL_MANIFEST.format(rank=rank)
            if not partial_path.is_file():
                raise CheckpointCommitError(f"{ckpt.path}: rank {rank} did not report its files ({partial_path.name})")
            files.update(read_json(partial_path)["files"])
        on_disk = set(self._list_files(ckpt.path))
        if on_disk != set(files):
            raise CheckpointCommitError(
                f"{ckpt.path}: files changed while committing: unhashed {sorted(on_disk - set(files))}, "
                f"vanished {sorted(set(files) - on_disk)}"
            )
        write_json(ckpt.path / MANIFEST, {"format_version": FORMAT_VERSION, "step": ckpt.step,
                                          "world_size": self.world_size, "files": files})
        for rank in range(self.world_size):
            (ckpt.path / _PARTIAL_MANIFEST.format(rank=rank)).unlink()
        fsync_dir(ckpt.path)
        replaced = None
        if ckpt.final_path.exists():  # re-saving a step (e.g. after resuming from an earlier one): move it aside
            replaced = self.root / f"{DELETING_PREFIX}{ckpt.final_path.name}-{uuid.uuid4().hex[:8]}"
            os.rename(ckpt.final_path, replaced)
        os.rename(ckpt.path, ckpt.final_path)
        fsync_dir(self.root)
        self._write_commit_marker(ckpt.final_path)
        if replaced is not None:
            shutil.rmtree(replaced, ignore_errors=True)
        self._prune(protect=ckpt.final_path)

    def _write_commit_marker(self, final_path: Path) -> None:
        """The last write of a commit: until this file exists the folder is not a checkpoint."""
        write_json(final_path / COMMITTED, {"manifest_sha256": sha256_file(final_path / MANIFEST)})

    # ---------------------------------------------------------------- reading
    def committed_steps(self) -> list[tuple[int, Path]]:
        """(step, path) of every folder with a COMMITTED marker, newest first (not verified)."""
        return [(step, path) for step, path in self._step_dirs() if (path / COMMITTED).is_file()]

    def latest_valid(self, verify: str | None = None) -> Path | None:
        """The newest committed checkpoint whose manifest verifies, or None. Each folder skipped (no COMMITTED,
        missing file, size or checksum mismatch) is logged as a warning naming the file and the reason."""
        for _, path in self._step_dirs():
            try:
                self.verify(path, mode=verify or self.verify_on_load)
            except CheckpointIntegrityError as err:
                logger.warning("skipping checkpoint %s: %s: %s", err.path, err.file, err.reason)
                continue
            return path
        return None

    def verify(self, path: str | os.PathLike, mode: str = "full") -> dict[str, Any]:
        """Check a checkpoint folder against its manifest; return the manifest or raise CheckpointIntegrityError.

        mode "full" hashes every file (a single flipped byte is caught); "sizes" checks presence and sizes only.
        The manifest itself is pinned by its sha256 in COMMITTED."""
        if mode not in VERIFY_MODES:
            raise ValueError(f"verify: mode must be one of {VERIFY_MODES}, got {mode!r}")
        path = Path(path)
        if not (path / COMMITTED).is_file():
            raise CheckpointIntegrityError(path, COMMITTED, "missing: the checkpoint was never committed")
        if not (path / MANIFEST).is_file():
            raise CheckpointIntegrityError(path, MANIFEST, "missing")
        try:
            expected_manifest_sha = read_json(path / COMMITTED)["manifest_sha256"]
        except (ValueError, KeyError, TypeError) as err:
            raise CheckpointIntegrityError(path, COMMITTED, f"unreadable marker: {err}") from err
        if sha256_file(path / MANIFEST) != expected_manifest_sha:
            raise CheckpointIntegrityError(path, MANIFEST, "checksum mismatch with the COMMITTED marker")
        manifest = read_json(path / MANIFEST)
        if not isinstance(manifest.get("files"), dict):
            raise CheckpointIntegrityError(path, MANIFEST, "has no 'files' table")
        for rel, entry in sorted(manifest["files"].items()):
            file_path = path / rel
            if Path(rel).is_absolute() or ".." in Path(rel).parts:
                raise CheckpointIntegrityError(path, rel, "manifest entry points outside the checkpoint")
            if not file_path.is_file():
                raise CheckpointIntegrityError(path, rel, "missing")
            size = file_path.stat().st_size
            if size != entry["size"]:
                raise CheckpointIntegrityError(path, rel, f"size mismatch: {size} bytes, manifest says {entry['size']}")
            if mode == "full" and sha256_file(file_path) != entry["sha256"]:
                raise CheckpointIntegrityError(path, rel, "checksum mismatch (sha256 differs from the manifest)")
        unexpected = set(self._list_files(path)) - set(manifest["files"]) - {MANIFEST, COMMITTED}
        if unexpected:
            logger.warning("checkpoint %s: files not in the manifest (ignored): %s", path, sorted(unexpected))
        return manifest

    @staticmethod
    def read_metadata(path: str | os.PathLike) -> dict[str, Any]:
        """metadata.json of a checkpoint: {"step", "world_size", "created_unix", "format_version", "user"}."""
        return read_json(Path(path) / METADATA)

    # ---------------------------------------------------------------- housekeeping
    def _step_dirs(self) -> list[tuple[int, Path]]:
        if not self.root.is_dir():
            return []
        found = []
        for entry in self.root.iterdir():
            match = _STEP_DIR_RE.match(entry.name)
            if match and entry.is_dir():
                found.append((int(match.group(1)), entry))
        return sorted(found, key=lambda item: item[0], reverse=True)

    def _owner(self, rel: str) -> int:
        """Files under rank-NNNNN/ (N < world_size) are that rank's to hash; everything else is rank 0's."""
        match = _RANK_DIR_RE.match(Path(rel).parts[0])
        if match and len(Path(rel).parts) > 1 and int(match.group(1)) < self.world_size:
            return int(match.group(1))
        return 0

    @staticmethod
    def _list_files(folder: Path) -> list[str]:
        """Every file under `folder` (relative POSIX paths), except per-rank manifests and atomic-write temps."""
        found = []
        for dirpath, _, filenames in os.walk(folder):
            for name in filenames:
                if _PARTIAL_MANIFEST_RE.match(name) or (name.startswith(".") and ".tmp-" in name):
                    continue
                found.append((Path(dirpath) / name).relative_to(folder).as_posix())
        return sorted(found)

    def _remove_leftovers(self) -> None:
        """Rank 0, in `begin`: delete staging folders, half-pruned folders and step folders without COMMITTED."""
        for entry in self.root.iterdir():
            stale = entry.name.startswith((STAGING_PREFIX, DELETING_PREFIX)) or (
                _STEP_DIR_RE.match(entry.name) and not (entry / COMMITTED).is_file()
            )
            if stale and entry.is_dir():
                logger.warning("removing %s left by an interrupted checkpoint write or prune", entry)
                self._delete(entry)

    def _delete(self, folder: Path) -> None:
        """Rename first (atomic: a crash mid-delete leaves a `.deleting-` folder, never a half checkpoint)."""
        if not folder.name.startswith(DELETING_PREFIX):
            doomed = self.root / f"{DELETING_PREFIX}{folder.name}-{uuid.uuid4().hex[:8]}"
            os.rename(folder, doomed)
            folder = doomed
        shutil.rmtree(folder)

    def _prune(self, protect: Path) -> None:
        """Keep the newest `keep_last` committed checkpoints, `protect` (just committed) and the newest one whose
        sizes verify, so corrupt newer folders can never push the last good checkpoint out."""
        if self.keep_last is None:
            return
        committed = self.committed_steps()
        keep = {path for _, path in committed[: self.keep_last]} | {protect}
        for _, path in committed:
            try:
                self.verify(path, mode="sizes")
            except CheckpointIntegrityError:
                continue
            keep.add(path)
            break
        for _, path in committed:
            if path not in keep:
                logger.info("pruning checkpoint %s (keep_last=%d)", path, self.keep_last)
                self._delete(path)


__all__ = [
    "COMMITTED", "DELETING_PREFIX", "FORMAT_VERSION", "MANIFEST", "METADATA", "STAGING_PREFIX", "VERIFY_MODES",
    "CheckpointCommitError", "CheckpointIntegrityError", "CheckpointManager", "StagedCheckpoint", "step_dir_name",
]
