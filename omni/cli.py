"""The `omni` command line.

    omni demo                                   # a tiny omni model on a mixed text/image/video/audio batch
    omni data synth OUT [--seed S] [--num N]    # the synthetic omni dataset + its webdataset shards
    omni data build MANIFEST --media-root DIR --out DIR
    omni train RECIPE [key=value ...] [--dry-run]  # a training recipe, stage after stage; re-run to resume
    omni export CHECKPOINT OUT [--merge-lora] [--push-to-hub REPO_ID [--private] [--dry-run]]  # -> HF folder / Hub
    omni eval CHECKPOINT --data DIR [--split test] [--json OUT] [--routing]  # exact match per modality/task
    omni bench moe|ep|data|serve [flags]            # benchmarks (side-by-side ratios in one run)
    omni chat PATH [-p PROMPT --image x.png ...] [--json]  # chat with a model; media attached by path
    omni serve PATH [--port 8000] [--api-key KEY] [--media-root DIR]  # OpenAI-compatible API + web chat page

Every subcommand explains its flags with --help.
"""

from __future__ import annotations

import argparse
import sys

from omni import chat, data_commands, demo, evaluate, export, serve, train


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="omni", description="Train, export and chat with omnimodal sparse-MoE LLMs.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    demo.add_parser(sub)
    data_commands.add_parser(sub)
    train.add_parser(sub)
    export.add_parser(sub)
    chat.add_parser(sub)
    serve.add_parser(sub)
    evaluate.add_parser(sub)
    bench = sub.add_parser("bench", help="benchmarks (each prints side-by-side ratios measured in one run)",
                           description="Each benchmark takes its own flags; see `omni bench NAME --help`.")
    bench_sub = bench.add_subparsers(dest="bench", required=True, metavar="BENCH")
    for name, help_text in BENCHMARKS.items():
        # add_help=False: `--help` reaches the benchmark's own parser, which lists its flags
        bench_sub.add_parser(name, help=help_text, add_help=False).set_defaults(handler=_run_benchmark)
    return parser


BENCHMARKS = {
    "moe": "MoE layer vs transformers' MoE blocks and the active-dense GEMM floor",
    "ep": "EP=2 vs EP=1 DeepSpeed step time for the same global batch (2 processes)",
    "data": "reader + collator throughput vs the samples/s a tiny training step consumes",
    "train_step": "training step tokens/s vs a same-size transformers Qwen2MoeForCausalLM (plain PyTorch loop)",
    "serve": "omni serve generated tokens/s at 1, 4 and 16 concurrent clients vs the same requests one by one",
}


def _run_benchmark(args: argparse.Namespace, rest: list[str]) -> int:
    import importlib

    result = importlib.import_module(f"omni.benchmarks.{args.bench}").main(rest)
    return int(result or 0)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    # benchmarks own their flags (they also run as `python -m omni.benchmarks.X`): pass the rest through
    args, rest = parser.parse_known_args(argv)
    if rest and args.command != "bench":
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    return int(args.handler(args, rest) or 0)


if __name__ == "__main__":
    raise SystemExit(main())
