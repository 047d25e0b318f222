"""What `omni train` does once every stage is done (in the launching process, after the ranks exit): the stage-by-
stage eval table, the final model exported as a HF folder (OUTPUT/export, with its model card), and a few chat
answers from that export on held-out samples -- so a run ends showing what it produced.
"""

from __future__ import annotations

import json
from pathlib import Path

EXPORT_DIR = "export"


def eval_summary(output: Path, stage_names: list[str]) -> str | None:
    """Exact match per modality after each stage (from OUTPUT/<stage>/eval.json), or None when no stage has one."""
    from omni_moe.training.stage_eval import EVAL_FILE

    reports = {name: json.loads((output / name / EVAL_FILE).read_text(encoding="utf-8"))
               for name in stage_names if (output / name / EVAL_FILE).is_file()}
    if not reports:
        return None
    modalities = sorted({m for r in reports.values() for m in r["per_modality"]})
    lines = [f"{'stage':<18}" + "".join(f"{m:>9}" for m in modalities) + f"{'overall':>9}{'n':>6}"]
    for name, report in reports.items():
        cells = "".join(f"{100 * report['per_modality'][m]['exact_match']:>8.1f}%" if m in report["per_modality"]
                        else f"{'-':>9}" for m in modalities)
        lines.append(f"{name:<18}{cells}{100 * report['overall']:>8.1f}%{report['num_samples']:>6}")
    routing = reports[list(reports)[-1]].get("routing")
    if routing:
        lines += ["", "routing of the last stage (share of routed probability mass):",
                  f"{'modality':<10}{'own intra':>10}{'inter':>8}{'intra+inter':>13}{'uniform intra':>15}"]
        for m, r in routing["per_modality"].items():
            lines.append(f"{m:<10}{r['intra']:>10.3f}{r['inter']:>8.3f}{r['intra_plus_inter']:>13.3f}"
                         f"{r['uniform_intra_share']:>15.3f}")
    return "\n".join(lines)


def chat_examples(folder: Path, data_dir: str, split: str, count: int) -> list[str]:
    """`count` held-out questions (one modality after another) answered by the exported model through `omni chat`'s
    session, each line with the expected answer."""
    from omni.chat import ChatSession, load_for_chat
    from omni_moe.training.evaluation import load_split

    model, processor = load_for_chat(str(folder), device="cpu")
    samples, picked, seen = load_split(data_dir, split), [], set()
    for sample in samples:  # the first sample of each modality, then the next ones
        modality = (sample.get("meta") or {}).get("modality", "text")
        if modality not in seen:
            seen.add(modality)
            picked.append(sample)
    picked += [s for s in samples if s not in picked]
    lines = []
    for sample in picked[:count]:
        session = ChatSession(model, processor)
        for kind, field in (("image", "images"), ("audio", "audios"), ("video", "videos")):
            for path in sample.get(field) or []:
                # a video is a list of frame files: chat takes their folder
                session.attach(kind, str(Path(data_dir) / (Path(path[0]).parent if isinstance(path, list) else path)))
        question = sample["messages"][-2]["content"]
        for marker in ("<image>", "<audio>", "<video>"):
            question = question.replace(marker, "")
        answer = session.ask(question.strip())
        media = ", ".join(str(Path(p[0]).parent if isinstance(p, list) else p)
                          for f in ("images", "audios", "videos") for p in sample.get(f) or [])
        lines.append(f"  [{media or 'text'}] {question.strip()}\n    answer: {answer.text.strip()!r}   "
                     f"(expected {sample['messages'][-1]['content']!r})")
    return lines


def finish_run(recipe) -> None:
    """Print the eval summary, export the last stage's model to OUTPUT/export, print chat answers from it."""
    from omni.export import export_model
    from omni_moe.training.pipeline import DONE_FILE, MODEL_DIR

    output = Path(recipe.run.output_dir)
    names = [stage.name for stage in recipe.stages]
    if not (output / names[-1] / DONE_FILE).is_file():
        return  # stopped early (train.stop_after_steps): nothing final yet
    summary = eval_summary(output, names)
    if summary:
        print(f"\n== exact match on the {recipe.eval.split} split after each stage ==\n{summary}\n", flush=True)
    exported = export_model(output / names[-1] / MODEL_DIR, output / EXPORT_DIR, overwrite=True)
    print(f"omni train: exported the final model -> {exported.out} ({len(exported.shards)} shard(s), model card "
          f"README.md); try `omni chat {exported.out}`", flush=True)
    if recipe.eval.data is not None and recipe.eval.examples > 0:
        lines = chat_examples(exported.out, recipe.eval.data, recipe.eval.split, recipe.eval.examples)
        print(f"\nchat answers from {exported.out}:\n" + "\n".join(lines) + "\n", flush=True)


__all__ = ["EXPORT_DIR", "chat_examples", "eval_summary", "finish_run"]
