"""Upcycling memory: the peak resident memory of `omni_moe.modeling.upcycle.upcycle` against the bytes of the model it returns.

    python -m omni.benchmarks.upcycle_memory                  # bf16, a ~0.2 B dense Qwen2 -> ~0.55 B MoE
    python -m omni.benchmarks.upcycle_memory --dtype float32 --layers 4

Writes a dense Qwen2 checkpoint (safetensors, bf16, sharded like a hub checkpoint) to a temporary directory, then
upcycles it in a fresh process (so nothing of the writer is resident) the way the real-scale recipe does: slice init,
2 intra experts per modality + 8 inter, a shared expert. Prints the process's peak RSS above its RSS just before the
call, the returned model's bytes, and their ratio. Every rank of a run upcycles, so at real scale (Qwen2.5-7B -> a
15.8 B MoE, 8 ranks a node) the ratio decides whether a node's host memory suffices: 1.0 is the floor (the model
itself); the dense checkpoint is read a tensor at a time.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time

import torch

MOE = dict(expert_init="slice", num_intra_experts=2, num_inter_experts=8, num_shared_experts=1, num_null_experts=2,
           num_experts_per_tok=4)


def write_dense(path: str, args) -> None:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=4 * args.hidden,
                         num_hidden_layers=args.layers, num_attention_heads=args.hidden // 64,
                         num_key_value_heads=max(1, args.hidden // 256), tie_word_embeddings=False)
    with torch.device("meta"):
        model = Qwen2ForCausalLM(config)
    model = model.to_empty(device="cpu").to(torch.bfloat16)
    for p in model.parameters():
        p.data.normal_(std=0.02)
    model.save_pretrained(path, max_shard_size="200MB")


def max_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def current_rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def measure(path: str, dtype: str, hidden: int) -> dict:
    """In this (fresh) process: upcycle `path`, report memory and time."""
    from omni_moe.modeling.upcycle import upcycle

    torch.set_num_threads(2)
    before = current_rss_bytes()
    start = time.perf_counter()
    model = upcycle(path, dtype=getattr(torch, dtype), moe_intermediate_size=hidden, image_token_id=0,
                    shared_expert_intermediate_size=2 * hidden, **MOE)
    seconds = time.perf_counter() - start
    params = {id(p): p for p in model.parameters()}.values()
    model_bytes = sum(p.numel() * p.element_size() for p in params)
    return {"peak_above_start": max_rss_bytes() - before, "model_bytes": model_bytes, "seconds": seconds,
            "params": sum(p.numel() for p in params)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
    parser.add_argument("--measure", help=argparse.SUPPRESS)  # internal: the child process's checkpoint path
    args = parser.parse_args()
    if args.measure:
        print(json.dumps(measure(args.measure, args.dtype, args.hidden)))
        return
    with tempfile.TemporaryDirectory() as tmp:
        write_dense(tmp, args)
        out = subprocess.run([sys.executable, "-m", "omni.benchmarks.upcycle_memory", "--measure", tmp,
                              "--dtype", args.dtype, "--hidden", str(args.hidden)],
                             check=True, capture_output=True, text=True).stdout
    result = json.loads(out.strip().splitlines()[-1])
    gib = 2**30
    print(f"dense Qwen2: hidden {args.hidden}, {args.layers} layers, vocab {args.vocab}, bf16 safetensors")
    print(f"upcycled ({args.dtype}): {result['params'] / 1e9:.3f} B parameters, {result['model_bytes'] / gib:.2f} GiB")
    print(f"peak RSS above start: {result['peak_above_start'] / gib:.2f} GiB = "
          f"{result['peak_above_start'] / result['model_bytes']:.2f}x the model; {result['seconds']:.1f} s")


if __name__ == "__main__":
    main()
