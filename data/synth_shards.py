"""The synthetic dataset made whole: media and manifests (data/synth.py), then webdataset shards of every split,
optionally one shard folder per task. `omni data synth` and the training pipeline's `omni_moe.data.synth` both call
`make_synth_dataset`."""

from __future__ import annotations

import json
from pathlib import Path

from .quality import DropPolicy


def make_synth_dataset(out: str | Path, *, seed: int = 0, num: int = 4400, eval_num: int | None = None,
                       image_size: int = 32, tasks: list[str] | None = None, max_samples_per_shard: int = 100,
                       shards: bool = True, shards_by_task: bool = False, overwrite: bool = False,
                       progress: bool = True) -> list[str]:
    """Generate the dataset in `out` and shard every split under out/shards/<split>[/<task>]; returns one summary
    line per split."""
    from .shards import build_shards
    from .synth import generate

    manifests = generate(out, seed=seed, num=num, eval_num=eval_num, image_size=image_size, tasks=tasks,
                         overwrite=overwrite, progress=progress)
    lines = []
    for split, manifest in manifests.items():
        line = f"{split}: {manifest}"
        if shards:
            folder = Path(out) / "shards" / split
            parts = split_manifest_by_task(manifest, folder) if shards_by_task else {"": Path(manifest)}
            built = [build_shards(part, out, folder / task, max_samples_per_shard=max_samples_per_shard,
                                  policy=DropPolicy(strict=True), progress=False) for task, part in parts.items()]
            line += (f" -> {sum(len(i['shards']) for i in built)} shard(s), {sum(i['num_samples'] for i in built)} "
                     f"samples" + (f" in {len(built)} task folders" if shards_by_task else ""))
        lines.append(line)
    return lines


def split_manifest_by_task(manifest: str | Path, out_dir: Path) -> dict[str, Path]:
    """`meta.task` -> a manifest of that task's lines (written under `out_dir`/manifests/, in manifest order)."""
    lines: dict[str, list[str]] = {}
    with open(manifest, encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if line.strip():
                task = (json.loads(line).get("meta") or {}).get("task")
                if not task:
                    raise ValueError(f"{manifest}:{number}: no meta.task to group shards by")
                lines.setdefault(task, []).append(line if line.endswith("\n") else line + "\n")
    folder = out_dir / "manifests"
    folder.mkdir(parents=True, exist_ok=True)
    parts = {}
    for task, task_lines in sorted(lines.items()):
        parts[task] = folder / f"{task}.jsonl"
        parts[task].write_text("".join(task_lines), encoding="utf-8")
    return parts


__all__ = ["make_synth_dataset", "split_manifest_by_task"]
