"""`omni eval`: exact match, token F1 and (for transcriptions) word error rate per modality and per task, and where
each modality's tokens are routed.

    omni eval CHECKPOINT --data DIR [--split test] [--limit N] [--batch-size 64] [--max-new-tokens 16]
              [--json OUT] [--routing]

CHECKPOINT is an exported model folder (`omni.loading.load_model_and_processor`). DIR is a canonical dataset folder
(`omni data synth DIR` makes one): `DIR/<split>.jsonl` holds one sample a line, media paths relative to DIR. The
generation and the report are `omni_moe.training.evaluation.evaluate`; the metrics are `omni_moe.training.scoring`'s.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from omni_moe.training.evaluation import evaluate, load_split


def add_parser(sub) -> None:
    p = sub.add_parser("eval", help="exact match, token F1 and WER per modality and task (table + JSON), routing",
                       description=__doc__.split("\n\n")[0],
                       epilog="Answers are compared after lower-casing, collapsing whitespace and dropping one "
                              "trailing period. WER is reported for samples whose meta.metric is \"wer\".")
    p.add_argument("checkpoint", help="exported model folder (config.json + *.safetensors + processor files)")
    p.add_argument("--data", required=True, metavar="DIR",
                   help="canonical dataset folder holding <split>.jsonl (media paths relative to it)")
    p.add_argument("--split", default="test", help="which DIR/<split>.jsonl to evaluate (val or test; default test)")
    p.add_argument("--limit", type=int, default=None, metavar="N", help="evaluate only the first N samples")
    p.add_argument("--batch-size", type=int, default=64, help="prompts generated together (default 64)")
    p.add_argument("--max-new-tokens", type=int, default=16, help="longest answer generated (default 16)")
    p.add_argument("--json", default=None, metavar="OUT",
                   help="also write the report as JSON to OUT (per modality/task, overall, examples, routing)")
    p.add_argument("--trust-remote-code", action="store_true",
                   help="let the model folder's own .py files (its auto_map) load the processor; off by default: a folder is read with this package's classes and none of its code runs")
    p.add_argument("--routing", action="store_true",
                   help="add a teacher-forced pass reporting each modality's routed probability mass per pool")
    p.set_defaults(handler=run)


def run(args: argparse.Namespace, rest=None) -> int:
    from omni.loading import load_model_and_processor

    try:
        samples = load_split(args.data, args.split, args.limit)  # data errors first: no model load to wait for
        model, processor = load_model_and_processor(args.checkpoint, trust_remote_code=args.trust_remote_code)
    except (FileNotFoundError, ValueError) as exc:
        print(f"omni eval: error: {exc}", file=sys.stderr)
        return 2
    report = evaluate(model, processor, samples, args.data, batch_size=args.batch_size,
                      max_new_tokens=args.max_new_tokens, routing=args.routing)
    print(report.format_table())
    if args.json:
        out = Path(args.json)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report.to_dict(checkpoint=str(args.checkpoint), split=args.split), indent=2) + "\n")
        print(f"wrote {out}")
    return 0


__all__ = ["add_parser", "run"]
