"""Training-step benchmark: our OmniMoeForCausalLM vs a same-size transformers Qwen2MoeForCausalLM, plain PyTorch loop.

    python -m omni.benchmarks.train_step                  # defaults below; about a minute on 2 cores
    omni bench train_step --batch 8 --seq 256 --repeats 8

Both models: the same decoder size (hidden 256, 4 layers, 8 heads / 4 kv heads, vocab 4096), every layer sparse MoE
with 8 routed experts of FFN 512, top-2, one shared expert of FFN 512 behind a sigmoid gate, fp32 on the CPU, the same
token batch, forward + backward + AdamW step. Ours runs as one modality pool (text only, no null experts), which is
exactly transformers' Qwen2-MoE routing; its router aux loss is on for both. transformers runs each experts backend
it offers on the CPU. Steps alternate between the variants (noise hits all alike); medians are reported as tokens/s
and as ratios against ours.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from transformers import Qwen2MoeConfig, Qwen2MoeForCausalLM

from omni_moe.modeling.configuration_omni import OmniMoeConfig
from omni_moe.modeling.modeling_omni import OmniMoeForCausalLM
from omni.benchmarks.moe import cpu_expert_backends


def sizes(args) -> dict:
    return dict(
        vocab_size=args.vocab, hidden_size=args.hidden, num_hidden_layers=args.layers, num_attention_heads=8,
        num_key_value_heads=4, max_position_embeddings=4096, tie_word_embeddings=False,
    )


def ours(args) -> OmniMoeForCausalLM:
    config = OmniMoeConfig(
        **sizes(args), intermediate_size=args.ffn, moe_intermediate_size=args.ffn, modalities=["text"],
        num_intra_experts=0, num_inter_experts=args.experts, num_shared_experts=1,
        shared_expert_intermediate_size=args.ffn, num_null_experts=0, num_experts_per_tok=args.top_k,
        router_aux_loss_coef=0.01, router_z_loss_coef=0.0,
    )
    return OmniMoeForCausalLM(config)


def theirs(args, backend: str) -> Qwen2MoeForCausalLM:
    config = Qwen2MoeConfig(
        **sizes(args), intermediate_size=args.ffn, moe_intermediate_size=args.ffn, num_experts=args.experts,
        num_experts_per_tok=args.top_k, shared_expert_intermediate_size=args.ffn, decoder_sparse_step=1,
        norm_topk_prob=True, output_router_logits=True, router_aux_loss_coef=0.01,
    )
    config._experts_implementation = backend
    return Qwen2MoeForCausalLM(config)


def make_step(model, batch):
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def step():
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="omni bench train_step", description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8, help="sequences per step")
    parser.add_argument("--seq", type=int, default=256, help="tokens per sequence")
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--ffn", type=int, default=512)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--repeats", type=int, default=8, help="timed steps per variant")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--backends", default=None,
                        help="comma-separated transformers experts backends (default: every CPU backend except "
                             "batched_mm, which gathers one expert weight copy per token-slot: 4.7 GB peak at 256 "
                             "tokens, out of memory at the default 2048 on this 24 GB machine)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    batch = torch.randint(0, args.vocab, (args.batch, args.seq))
    variants = {"ours": make_step(ours(args).train(), batch)}
    backends = args.backends.split(",") if args.backends else [b for b in cpu_expert_backends() if b != "batched_mm"]
    for backend in backends:
        try:
            step = make_step(theirs(args, backend).train(), batch)
            step()  # also the warm-up; a backend that cannot run here is skipped, not timed
        except Exception as err:  # noqa: BLE001 - report and go on with the others
            print(f"skipping transformers backend {backend!r}: {type(err).__name__}: {err}")
            continue
        variants[f"transformers-{backend}"] = step
    variants["ours"]()
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(args.repeats):
        for name, step in variants.items():
            start = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - start)
    tokens = args.batch * args.seq
    ours_s = statistics.median(times["ours"])
    print(f"\ntraining step, {tokens} tokens, fp32 CPU, {args.threads} threads, median of {args.repeats}")
    print("| variant | ms/step | tokens/s | ours speed-up |\n|---|---:|---:|---:|")
    for name, samples in times.items():
        sec = statistics.median(samples)
        print(f"| {name} | {sec * 1e3:.0f} | {tokens / sec:,.0f} | {sec / ours_s:.2f}x |")
    best = min((statistics.median(v), k) for k, v in times.items() if k != "ours")
    print(f"\nours vs the best transformers backend ({best[1]}): {best[0] / ours_s:.2f}x (target >= 1.5x)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
