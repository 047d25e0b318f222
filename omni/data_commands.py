"""`omni data synth` and `omni data build`: the synthetic dataset and the webdataset shard writer."""

from __future__ import annotations

import argparse
import json

from omni_moe.data.quality import DropPolicy


def add_parser(sub) -> None:
    data = sub.add_parser("data", help="build datasets: the synthetic omni set, or shards from a manifest")
    data_sub = data.add_subparsers(dest="data_command", required=True, metavar="DATA_COMMAND")

    synth = data_sub.add_parser(
        "synth",
        help="generate the synthetic omni dataset (media + manifests) and shard every split",
        description="Writes OUT/<split>.jsonl manifests, the media they reference, and OUT/shards/<split>/ "
        "(webdataset tars + index.json). Deterministic: the same seed gives byte-identical files.",
    )
    synth.add_argument("out", help="output folder")
    synth.add_argument("--seed", type=int, default=0, help="dataset seed; splits use disjoint seeds derived from it")
    synth.add_argument("--num", type=int, default=4400, help="train samples in total (tasks share it equally)")
    synth.add_argument("--eval-num", type=int, default=None, help="samples per val/test split (default num // 10)")
    synth.add_argument("--image-size", type=int, default=32, help="canvas size of images and video frames (px)")
    synth.add_argument("--tasks", default=None, help="comma-separated subset of tasks (default: all)")
    synth.add_argument("--max-samples-per-shard", type=int, default=100,
                       help="samples per tar shard (small: every rank x dataloader worker needs shards of its own)")
    synth.add_argument("--no-shards", action="store_true", help="write media and manifests only")
    synth.add_argument("--shards-by-task", action="store_true",
                       help="one shard set per task, OUT/shards/<split>/<task>/, so a recipe can mix tasks by weight")
    synth.add_argument("--overwrite", action="store_true", help="replace an existing dataset in OUT")
    synth.set_defaults(handler=run_synth)

    build = data_sub.add_parser(
        "build",
        help="validate a manifest and its media, write webdataset shards and index.json",
        description="Reads a JSONL manifest (canonical samples, or LLaVA/Uni-MoE records), validates every sample "
        "and decodes its media once, writes shard-NNNNNN.tar files and index.json (counts, length histogram, and "
        "every rejected sample with its reason). Re-running on the same input gives byte-identical shards.",
    )
    build.add_argument("manifest", help="manifest file (.jsonl, or .json holding a list)")
    build.add_argument("--media-root", required=True, help="folder that media paths in the manifest are relative to")
    build.add_argument("--out", required=True, help="output folder for shards and index.json")
    build.add_argument("--max-samples-per-shard", type=int, default=1000, help="start a new shard after N samples")
    build.add_argument("--max-shard-bytes", type=int, default=1 << 30, help="start a new shard before B bytes")
    build.add_argument("--max-length", type=int, default=None, help="reject samples longer than this (characters)")
    build.add_argument("--strict", action="store_true", help="stop at the first bad sample instead of skipping it")
    build.add_argument("--max-drop-rate", type=float, default=0.05, help="abort when more than this fraction is rejected")
    build.set_defaults(handler=run_build)


def run_synth(args: argparse.Namespace, rest=None) -> int:
    from omni_moe.data.synth_shards import make_synth_dataset

    for line in make_synth_dataset(
        args.out, seed=args.seed, num=args.num, eval_num=args.eval_num, image_size=args.image_size,
        tasks=args.tasks.split(",") if args.tasks else None, max_samples_per_shard=args.max_samples_per_shard,
        shards=not args.no_shards, shards_by_task=args.shards_by_task, overwrite=args.overwrite,
    ):
        print(line)
    return 0


def run_build(args: argparse.Namespace, rest=None) -> int:
    from omni_moe.data.shards import build_shards

    policy = DropPolicy(strict=args.strict, max_drop_rate=args.max_drop_rate)
    index = build_shards(
        args.manifest, args.media_root, args.out, max_samples_per_shard=args.max_samples_per_shard,
        max_shard_bytes=args.max_shard_bytes, max_length=args.max_length, policy=policy,
    )
    summary = {"num_samples": index["num_samples"], "rejected": len(index["rejected"]), "shards": len(index["shards"])}
    print(json.dumps(summary))
    return 0
