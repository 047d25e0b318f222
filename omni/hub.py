"""Push an exported model folder to the Hugging Face Hub, or list what would be pushed.

    omni export CHECKPOINT OUT --push-to-hub user/name [--private] [--dry-run]

`push_folder` = `HfApi.create_repo(repo_id, private=..., exist_ok=True)` + `HfApi.upload_folder` (one commit), or
`HfApi.upload_large_folder` (resumable, several commits) for folders above `LARGE_FOLDER_BYTES`.

Token: huggingface_hub's own lookup (the HF_TOKEN environment variable, else the login stored by `hf auth login`);
this module never reads, prints, logs or writes it. Endpoint: HF_ENDPOINT, read when the push runs (so a test or a
mirror can point it elsewhere), else the public Hub. `--dry-run` talks to no server at all.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Callable
from pathlib import Path

# Above this, one upload_folder commit is fragile (huggingface_hub recommends upload_large_folder for big folders).
LARGE_FOLDER_BYTES = 20 * 2**30


class HubPushError(RuntimeError):
    """The push did not complete (the message names the repo and the reason; never the token)."""


def _ignored(rel: str) -> bool:
    """What upload_folder always skips (its DEFAULT_IGNORE_PATTERNS): .git/ and its own .cache/huggingface/."""
    parts = rel.split("/")
    return ".git" in parts or any(a == ".cache" and b == "huggingface" for a, b in itertools.pairwise(parts))


def upload_plan(folder: str | Path) -> list[tuple[str, int]]:
    """(path in the repo, size in bytes) of every file an upload of `folder` sends, sorted by path."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: no such folder to upload")
    files = []
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        rel = path.relative_to(folder).as_posix()
        if not _ignored(rel):
            files.append((rel, path.stat().st_size))
    return files


def human_size(size: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1000 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1000
    return f"{size:.1f} GB"


def describe_plan(repo_id: str, plan: list[tuple[str, int]], private: bool) -> str:
    total = sum(size for _, size in plan)
    lines = [f"{'private' if private else 'public'} model repo {repo_id}: {len(plan)} files, {human_size(total)}"]
    lines += [f"  {human_size(size):>10}  {rel}" for rel, size in plan]
    return "\n".join(lines)


def push_folder(folder: str | Path, repo_id: str, *, private: bool = False, dry_run: bool = False,
                commit_message: str | None = None, large_folder_bytes: int = LARGE_FOLDER_BYTES,
                report: Callable[[str], None] = print) -> str | None:
    """Create `repo_id` if needed and upload `folder` to it; returns the commit (or repo) URL. With `dry_run`,
    report the files and sizes that would be uploaded, contact nothing and return None."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError

    plan = upload_plan(folder)
    if not plan:
        raise HubPushError(f"{folder}: nothing to upload (empty folder)")
    report(("dry run, nothing uploaded -- would upload to " if dry_run else "uploading to ")
           + describe_plan(repo_id, plan, private))
    if dry_run:
        return None
    api = HfApi(endpoint=os.environ.get("HF_ENDPOINT") or None)
    try:
        repo_url = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        if sum(size for _, size in plan) > large_folder_bytes:
            api.upload_large_folder(repo_id=repo_id, folder_path=str(folder), repo_type="model", private=private)
            return str(repo_url)
        info = api.upload_folder(repo_id=repo_id, folder_path=str(folder), repo_type="model",
                                 commit_message=commit_message or "Upload model exported with omni export")
    except (HfHubHTTPError, OSError, ValueError) as err:
        raise HubPushError(f"push of {folder} to {repo_id} failed: {type(err).__name__}: {err}") from None
    return info.commit_url


__all__ = ["LARGE_FOLDER_BYTES", "HubPushError", "describe_plan", "human_size", "push_folder", "upload_plan"]
