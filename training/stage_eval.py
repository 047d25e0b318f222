"""Held-out evaluation between training stages (the recipe's `eval:` section), run by every rank of the job.

Each rank evaluates its share of the split (samples rank::world) on a single-device copy of the stage's model --
the exported folder, so the numbers are those of what a user downloads -- and rank 0 scores the gathered
predictions (`omni_moe.training.scoring`), prints the table and writes OUTPUT/<stage>/eval.json (which `omni export`'s model
card reads). A dense_pretrain stage (text only, no processor for media) is evaluated on the text samples.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.distributed as dist

from omni_moe.training.distributed import get_rank, get_world_size
from omni_moe.training.evaluation import evaluate, load_split
from omni_moe.training.scoring import score_predictions

EVAL_FILE = "eval.json"


def evaluate_stage(recipe, stage_name: str, model, processor, stage_dir: Path, *, text_only: bool = False,
                   final: bool = False) -> dict | None:
    """Collective. Returns the report dict on rank 0 (None elsewhere, or when the recipe has no eval data)."""
    spec = recipe.eval
    if spec.data is None:
        return None
    limit = spec.final_limit if final else spec.limit
    samples = load_split(spec.data, spec.split)
    if text_only:
        samples = [s for s in samples if not any(s.get(k) for k in ("images", "videos", "audios"))]
    samples = _spread(samples, limit)
    rank, world = get_rank(), get_world_size()
    mine = samples[rank::world]
    with torch.no_grad():
        report = evaluate(model, processor, mine, spec.data, batch_size=spec.batch_size,
                          max_new_tokens=spec.max_new_tokens, routing=not text_only and rank == 0)
    gathered = [None] * world
    if dist.is_initialized() and world > 1:
        dist.all_gather_object(gathered, report.predictions)
    else:
        gathered = [report.predictions]
    if rank != 0:
        return None
    full = score_predictions([p for part in gathered for p in part])
    full.routing = report.routing  # rank 0's share of the split (routing needs no generation: half is plenty)
    result = full.to_dict(checkpoint=str(stage_dir / "model"), split=spec.split)
    (stage_dir / EVAL_FILE).write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(f"\n== eval after stage {stage_name} ({spec.split} split, {full.num_samples} samples) ==\n"
          f"{full.format_table()}\n", flush=True)
    return result


def _spread(samples: list[dict], limit: int | None) -> list[dict]:
    """The first `limit` samples taking tasks round-robin, so a limited eval still covers every task evenly."""
    if limit is None or limit >= len(samples):
        return samples
    by_task: dict[str, list[dict]] = {}
    for s in samples:
        by_task.setdefault((s.get("meta") or {}).get("task", ""), []).append(s)
    queues = list(by_task.values())
    picked: list[dict] = []
    while len(picked) < limit:
        for queue in queues:
            if queue and len(picked) < limit:
                picked.append(queue.pop(0))
    return picked


__all__ = ["EVAL_FILE", "evaluate_stage"]
