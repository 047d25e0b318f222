"""MoE layer benchmark: forward+backward of our OmniSparseMoeBlock vs transformers' MoE blocks and the GEMM floor.

    python -m omni.benchmarks.moe                # --tokens 4096 --hidden 256 --ffn 512 --experts 8 --top-k 2 --threads 2
    python -m omni.benchmarks.moe --repeats 5 --threads 1 --scaling 4,8

Single pool (one modality, no shared or null experts), fp32, on the CPU. Variants are timed interleaved (one
repetition of each in turn, so machine noise hits all alike) and reported as medians; parameter and input grads are
reset to None before each step, as `zero_grad(set_to_none=True)` does in training.
  ours            OmniSparseMoeBlock (experts.implementation "auto"), plus its per-expert "loop" fallback
  hf-mixtral X    transformers' MixtralSparseMoeBlock (it has no shared expert; top-k renormalised like ours) with
                  each experts backend the installed transformers runs on the CPU. batched_mm gathers a full weight
                  matrix per token-slot (8.6 GB for gate_up alone at the defaults), so it is timed on
                  --batched-tokens tokens and scaled linearly to --tokens (its cost is linear in tokens).
  active-dense    the same tokens x top-k rows through plain GEMMs of one expert's shape (x@W1, act, @W2): the same
                  FLOPs as the routed compute, i.e. the floor routing overhead is measured against.
A second table (half the repeats, 1 warm-up round) times ours, transformers' eager block and active-dense as the
expert count grows at fixed top-k (routed FLOPs stay constant; more experts means smaller GEMMs and more expert
weights to write gradients for). Timings on a machine shared with other jobs swing widely: read ratios within
one run, and the printed load average.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from omni_moe.modeling.configuration_omni import OmniMoeConfig
from omni_moe.modeling.moe import OmniSparseMoeBlock

# Backends that need GPU kernels from the Hub; everything else registered in ExpertsInterface runs on the CPU.
GPU_ONLY_EXPERT_BACKENDS = ("deepgemm", "sonicmoe")
Step = Callable[[], None]
# fastest repetition of each variant in the last timing run: on a shared machine the least-disturbed sample
MINIMA: dict[str, float] = {}


def cpu_expert_backends() -> list[str]:
    from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

    return ["eager"] + [name for name in ALL_EXPERTS_FUNCTIONS if name not in GPU_ONLY_EXPERT_BACKENDS]


def single_pool_config(hidden: int, ffn: int, experts: int, top_k: int) -> OmniMoeConfig:
    return OmniMoeConfig(
        vocab_size=128, hidden_size=hidden, intermediate_size=ffn, moe_intermediate_size=ffn, num_hidden_layers=1,
        num_attention_heads=4, num_key_value_heads=4, modalities=["text"], num_intra_experts=0,
        num_inter_experts=experts, num_shared_experts=0, num_null_experts=0, num_experts_per_tok=top_k,
        norm_topk_prob=True,
    )


def _step(module: torch.nn.Module, x: torch.Tensor, forward: Callable[[], torch.Tensor]) -> Step:
    grad = torch.randn_like(x)

    def step() -> None:
        module.zero_grad(set_to_none=True)
        x.grad = None
        forward().backward(grad)

    return step


def make_ours(args, experts: int, implementation: str = "auto") -> Step:
    block = OmniSparseMoeBlock(single_pool_config(args.hidden, args.ffn, experts, args.top_k))
    block.experts.implementation = implementation
    x = torch.randn(1, args.tokens, args.hidden, requires_grad=True)
    modality_ids = torch.zeros(1, args.tokens, dtype=torch.long)
    return _step(block, x, lambda: block(x, modality_ids)[0])


def make_hf(args, backend: str, experts: int, tokens: int) -> Step:
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

    config = MixtralConfig(
        hidden_size=args.hidden, intermediate_size=args.ffn, num_local_experts=experts,
        num_experts_per_tok=args.top_k, router_jitter_noise=0.0,
    )
    config._experts_implementation = backend
    block = MixtralSparseMoeBlock(config)
    with torch.no_grad():
        for param in block.parameters():
            param.normal_(0.0, 0.02)
    x = torch.randn(1, tokens, args.hidden, requires_grad=True)
    return _step(block, x, lambda: block(x))


def make_active_dense(args) -> Step:
    dense = torch.nn.ModuleDict({
        "gate_up": torch.nn.Linear(args.hidden, 2 * args.ffn, bias=False),
        "down": torch.nn.Linear(args.ffn, args.hidden, bias=False),
    })
    x = torch.randn(args.tokens * args.top_k, args.hidden, requires_grad=True)

    def forward() -> torch.Tensor:
        gate, up = dense["gate_up"](x).chunk(2, dim=-1)
        return dense["down"](F.silu(gate) * up)

    return _step(dense, x, forward)


def time_interleaved(
    variants: dict[str, tuple[Step, float]], repeats: int, warmup: int = 2, stat: Callable = statistics.median
) -> dict[str, float]:
    """Milliseconds per call (median by default; times each variant's scale); one call of each variant per round."""
    samples: dict[str, list[float]] = {name: [] for name in variants}
    for round_idx in range(warmup + repeats):
        for name, (step, scale) in variants.items():
            start = time.perf_counter()
            step()
            if round_idx >= warmup:
                samples[name].append((time.perf_counter() - start) * 1e3 * scale)
    MINIMA.update({name: min(values) for name, values in samples.items()})
    return {name: stat(values) for name, values in samples.items()}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--ffn", type=int, default=512)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batched-tokens", type=int, default=64, help="tokens for hf batched_mm (scaled up)")
    parser.add_argument("--scaling", type=str, default="4,8,16,32,64", help="expert counts for the second table")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    load_before = os.getloadavg()[0]

    print(
        f"MoE fwd+bwd, fp32, CPU, {args.threads} threads: tokens={args.tokens} hidden={args.hidden} ffn={args.ffn} "
        f"experts={args.experts} top-k={args.top_k}; median of {args.repeats} interleaved repeats"
    )
    variants: dict[str, tuple[Step, float]] = {
        "ours": (make_ours(args, args.experts), 1.0),
        "ours, loop fallback": (make_ours(args, args.experts, "loop"), 1.0),
    }
    hf_names = []
    for backend in cpu_expert_backends():
        tokens = min(args.batched_tokens, args.tokens) if backend == "batched_mm" else args.tokens
        name = f"hf-mixtral {backend}" + (f" ({tokens} tokens x{args.tokens / tokens:g})" if tokens != args.tokens else "")
        variants[name] = (make_hf(args, backend, args.experts, tokens), args.tokens / tokens)
        hf_names.append(name)
    variants["active-dense"] = (make_active_dense(args), 1.0)
    times = time_interleaved(variants, args.repeats)

    minima = dict(MINIMA)
    ours = times["ours"]
    print("\n| variant | median ms | time / ours | min ms |\n|---|---:|---:|---:|")
    for name, ms in times.items():
        print(f"| {name} | {ms:.1f} | {ms / ours:.2f} | {minima[name]:.1f} |")
    best_hf = min(hf_names, key=times.__getitem__)
    eager = next(name for name in hf_names if "eager" in name)
    print(
        f"\nratios of medians (of minima in brackets):\n"
        f"ours vs {eager}: {times[eager] / ours:.2f}x faster ({minima[eager] / minima['ours']:.2f}x; target >= 3)\n"
        f"ours vs best transformers backend ({best_hf}): {times[best_hf] / ours:.2f}x faster "
        f"({minima[best_hf] / minima['ours']:.2f}x; target >= 1.0)\n"
        f"ours vs active-dense: {ours / times['active-dense']:.2f}x its time "
        f"({minima['ours'] / minima['active-dense']:.2f}x; target <= 1.3)"
    )

    counts = [int(c) for c in args.scaling.split(",") if c]
    if counts:
        # one interleaved run for the whole table, so load drift cannot favour one expert count
        scaling_variants: dict[str, tuple[Step, float]] = {"dense": (make_active_dense(args), 1.0)}
        for n in counts:
            scaling_variants[f"ours {n}"] = (make_ours(args, n), 1.0)
            scaling_variants[f"eager {n}"] = (make_hf(args, "eager", n, args.tokens), 1.0)
        # half the rounds: eager at 64 experts alone costs ~2.5 s a round, and a default run should stay ~1-2 min
        scaling = time_interleaved(scaling_variants, max(3, args.repeats // 2), warmup=1)
        dense, base = scaling["dense"], scaling[f"ours {counts[0]}"]
        print(f"\nactive-dense (any expert count): {dense:.1f} ms")
        print(f"| experts (top-{args.top_k}) | ours ms | ours vs {counts[0]} experts | ours / active-dense "
              f"| hf-mixtral eager ms | eager / ours |\n|---:|---:|---:|---:|---:|---:|")
        for n in counts:
            ours_n, eager_n = scaling[f"ours {n}"], scaling[f"eager {n}"]
            print(f"| {n} | {ours_n:.1f} | {ours_n / base:.2f} | {ours_n / dense:.2f} | {eager_n:.1f} "
                  f"| {eager_n / ours_n:.2f} |")
    print(f"\nload average (1 min) before/after: {load_before:.2f} / {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs")


if __name__ == "__main__":
    main()
