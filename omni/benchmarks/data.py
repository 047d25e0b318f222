"""Data pipeline benchmark: reader + collator throughput against what a tiny training step consumes.

    OMP_NUM_THREADS=2 python -m omni.benchmarks.data     # --num 2048 --batch-size 16 --workers 0,2 --rounds 3
    OMP_NUM_THREADS=2 python -m omni.benchmarks.data --num 512 --rounds 1   # quicker

Writes the synthetic omni dataset (`omni_moe.data.synth.generate`) and its shards (`omni_moe.data.shards.build_shards`) to a temporary
directory, then prints, from one run:
  1. the length function's cost: `OmniCollator.sequence_length` (exact, no media processing) against running the
     processor on one sample;
  2. samples/s and real tokens/s of `ResumableLoader` over the shards: reader only (decoded samples), and reader +
     exact lengths + `OmniCollator` (model-ready tensors), with each `--workers` count; rounds interleave the
     configurations and the median is reported. Every pipeline process uses 1 torch thread (what DataLoader
     workers get; measured: the processor's small ops run slower, not faster, on 2 threads);
  3. samples/s a training step consumes: forward + backward + AdamW step of the tiny omni model (`omni.demo`'s
     config) on the same collated batches (batch size 16), with OMP_NUM_THREADS threads, timed in every round
     after 3 warm-up steps, and the ratio pipeline / step (target >= 10x, so the data never waits the model);
  4. how much of each batching strategy's padded batch is real tokens (lengths only, no collation).
Pipeline and step are timed one after the other, each with the whole machine: in a real run the workers share the
cores with the step.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch

from omni_moe.data.batching import iter_batches, make_batching
from omni_moe.data.collate import OmniCollator
from omni_moe.data.loader import ResumableLoader
from omni_moe.data.reader import ShardDataset
from omni_moe.data.shards import build_shards
from omni_moe.data.synth import generate
from omni_moe.data.tokenizer import build_bpe_tokenizer
from omni_moe.modeling.modeling_omni import OmniMoeForCausalLM
from omni_moe.modeling.processing_omni import OmniMoeProcessor
from omni.demo import SENTENCES, tiny_omni_config


def build_dataset(root: Path, num: int, shards: int) -> Path:
    manifests = generate(root / "synth", seed=0, num=num, splits=("train",))
    per_shard = -(-num // shards)
    build_shards(manifests["train"], root / "synth", root / "shards", max_samples_per_shard=per_shard, progress=False)
    return root / "shards"


def time_loader(shard_dir: Path, collator: OmniCollator | None, batch_size: int, workers: int) -> tuple[float, float]:
    """(samples/s, real tokens/s) over one epoch; tokens are counted only when the collator runs."""
    transform = collator.measure if collator is not None else None
    dataset = ShardDataset(shard_dir, rank=0, world_size=1, seed=0, transform=transform)
    loader = ResumableLoader(dataset, batching=make_batching("mixed", batch_size=batch_size),
                             collate_fn=collator, num_workers=workers)
    samples = tokens = 0
    start = time.perf_counter()
    for batch in loader:  # includes worker start-up, as every epoch of a run pays it
        if collator is None:
            samples += len(batch)
        else:
            samples += batch.num_samples
            tokens += batch.num_tokens
    seconds = time.perf_counter() - start
    return samples / seconds, tokens / seconds


def time_lengths(collator: OmniCollator, shard_dir: Path, count: int = 200) -> tuple[float, float]:
    """(ms per sample with sequence_length, ms per sample with one processor call per sample)."""
    samples = [s for _, s in zip(range(count), ShardDataset(shard_dir, rank=0, world_size=1, seed=0))]
    start = time.perf_counter()
    for sample in samples:
        collator.sequence_length(sample)
    exact = (time.perf_counter() - start) / len(samples)
    start = time.perf_counter()
    for sample in samples:
        collator._process([sample])
    processor = (time.perf_counter() - start) / len(samples)
    return exact * 1e3, processor * 1e3


class TrainingStep:
    """Forward + backward + AdamW step of the tiny omni model on collated batches."""

    def __init__(self, config, batches: list, threads: int):
        torch.manual_seed(0)
        self.model = OmniMoeForCausalLM(config).train()
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=5e-4)
        self.batches, self.threads, self.done = batches, threads, 0

    def run(self, steps: int) -> tuple[float, float]:
        """(samples/s, mean ms per step) over `steps` steps."""
        torch.set_num_threads(self.threads)
        durations, samples = [], 0
        for _ in range(steps):
            batch = self.batches[self.done % len(self.batches)]
            self.done += 1
            start = time.perf_counter()
            self.model(**batch.inputs).loss.backward()
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            durations.append(time.perf_counter() - start)
            samples += batch.num_samples
        torch.set_num_threads(1)
        return samples / sum(durations), sum(durations) / len(durations) * 1e3


def padding_efficiency(shard_dir: Path, collator: OmniCollator, batch_size: int) -> list[tuple[str, float, float]]:
    """(strategy, real / padded tokens, mean samples per batch) for each strategy over one epoch's lengths."""
    max_length = 4 * max(s["num_tokens"] for s in ShardDataset(shard_dir, rank=0, world_size=1,
                                                                transform=collator.measure))
    budget = batch_size * 128  # about a mixed batch's padded size on this data
    strategies = {
        f"mixed (batch {batch_size})": make_batching("mixed", batch_size=batch_size),
        f"modality_grouped (batch {batch_size})": make_batching("modality_grouped", batch_size=batch_size,
                                                                lookahead=8 * batch_size),
        f"token_budget ({budget} tokens)": make_batching("token_budget", max_tokens=budget, lookahead=8 * batch_size),
        f"packed ({budget // max_length} rows of {max_length})": make_batching(
            "token_budget", packing=True, max_tokens=budget, max_length=max_length, lookahead=8 * batch_size),
    }
    rows = []
    for name, strategy in strategies.items():
        dataset = ShardDataset(shard_dir, rank=0, world_size=1, seed=0, transform=collator.measure)
        real = padded = samples = batches = 0
        for out in iter_batches(dataset.iter_tagged(), strategy):
            if out.items is None:
                continue
            units = out.items if strategy.name == "packed" else [[s] for s in out.items]
            lengths = [sum(s["num_tokens"] for s in unit) for unit in units]
            real, padded = real + sum(lengths), padded + len(lengths) * max(lengths)
            samples, batches = samples + sum(len(u) for u in units), batches + 1
        rows.append((name, real / padded, samples / batches))
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--num", type=int, default=2048, help="synthetic train samples")
    parser.add_argument("--shards", type=int, default=8, help="shards (a multiple of every worker count)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--workers", default="0,2", help="comma-separated DataLoader worker counts")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds per pipeline configuration")
    parser.add_argument("--steps", type=int, default=10, help="timed training steps per round (after 3 warm-up)")
    args = parser.parse_args(argv)
    workers = [int(w) for w in args.workers.split(",")]
    step_threads = int(os.environ.get("OMP_NUM_THREADS", torch.get_num_threads()))
    torch.set_num_threads(1)  # the pipeline, in the main process as in the workers

    tokenizer = build_bpe_tokenizer(SENTENCES, vocab_size=320)
    config = tiny_omni_config(tokenizer)
    collator = OmniCollator(OmniMoeProcessor.from_config(config, tokenizer))
    with tempfile.TemporaryDirectory(prefix="omni-bench-data-") as tmp:
        shard_dir = build_dataset(Path(tmp), args.num, args.shards)
        exact_ms, processor_ms = time_lengths(collator, shard_dir)
        print(f"length of one sample: sequence_length {exact_ms:.3f} ms, processor call {processor_ms:.2f} ms "
              f"({processor_ms / exact_ms:.0f}x)")

        dataset = ShardDataset(shard_dir, rank=0, world_size=1, seed=0, transform=collator.measure)
        batches = list(ResumableLoader(dataset, batch_size=args.batch_size, collate_fn=collator, drop_last=True))
        step = TrainingStep(config, batches, step_threads)
        step.run(3)  # warm-up
        # Rounds interleave every configuration and the step, so a busy spell on a shared machine hits all alike.
        configs = [(name, w) for name in ("reader", "reader+collator") for w in workers]
        results: dict[tuple[str, int], list[tuple[float, float]]] = {c: [] for c in configs}
        step_results = []
        for _ in range(args.rounds):
            for name, w in configs:
                results[(name, w)].append(time_loader(shard_dir, collator if name != "reader" else None,
                                                      args.batch_size, w))
            step_results.append(step.run(args.steps))
        step_rate = statistics.median(r[0] for r in step_results)
        step_ms = statistics.median(r[1] for r in step_results)
        efficiency = padding_efficiency(shard_dir, collator, args.batch_size)

    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    print(f"\n{args.num} synthetic samples (text/image/video/audio), batch size {args.batch_size}; pipeline: 1 torch "
          f"thread per process, step: {step_threads}; median of {args.rounds} round(s); load average {load}\n")
    print(f"| {'stage':<40} | {'workers':>7} | {'samples/s':>9} | {'tokens/s':>9} | {'vs step':>7} |")
    print(f"|{'-' * 42}|{'-' * 8}:|{'-' * 10}:|{'-' * 10}:|{'-' * 8}:|")
    for name, w in configs:
        rate = statistics.median(r[0] for r in results[(name, w)])
        tokens = statistics.median(r[1] for r in results[(name, w)])
        label = "reader (decoded samples)" if name == "reader" else "reader + exact lengths + OmniCollator"
        token_text = f"{tokens:9.0f}" if name != "reader" else f"{'-':>9}"
        print(f"| {label:<40} | {w:>7} | {rate:9.0f} | {token_text} | {rate / step_rate:6.1f}x |")
    step_label = f"tiny omni train step ({step_ms:.0f} ms/step)"
    print(f"| {step_label:<40} | {'-':>7} | {step_rate:9.0f} | {'-':>9} | {1:6.1f}x |")
    best = max(statistics.median(r[0] for r in results[("reader+collator", w)]) for w in workers)
    verdict = "met" if best >= 10 * step_rate else "NOT met"
    print(f"\npipeline / step = {best / step_rate:.1f}x (target >= 10x: {verdict})")
    print(f"\n| {'batching strategy':<40} | {'real/padded tokens':>18} | {'samples/batch':>13} |")
    print(f"|{'-' * 42}|{'-' * 19}:|{'-' * 14}:|")
    for name, ratio, per_batch in efficiency:
        print(f"| {name:<40} | {ratio:18.2f} | {per_batch:13.1f} |")


if __name__ == "__main__":
    main()
