"""Expert-parallel step time: EP=2 vs EP=1 for the same global batch, through the DeepSpeed engine, side by side.

    python -m omni.benchmarks.ep                     # defaults: 2 ranks, --steps 12 --rounds 2 --zero 1
    python -m omni.benchmarks.ep --seq 256 --hidden 256 --ffn 512

Both layouts run on the same 2 processes (gloo on loopback, OMP_NUM_THREADS=1 each) with the same per-rank
micro-batch, so the global batch and the compute per rank match: EP=1 is plain data parallelism (every rank holds
every expert), EP=2 splits the experts and moves tokens with all-to-all. Jobs alternate (EP=1, EP=2, EP=1, ...) for
`--rounds` rounds so machine noise hits both; each job reports the median of its timed steps (after `--warmup`),
and the table shows the median over rounds. A step = forward + backward + optimizer step, timed on rank 0 between
two barriers.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

WORLD_SIZE = 2


def _bench_config(args: argparse.Namespace):
    from omni_moe.modeling.configuration_omni import OmniMoeConfig

    return OmniMoeConfig(
        vocab_size=512, hidden_size=args.hidden, intermediate_size=args.ffn, moe_intermediate_size=args.ffn,
        shared_expert_intermediate_size=args.ffn, num_hidden_layers=args.layers, num_attention_heads=4,
        num_key_value_heads=2, num_intra_experts=args.intra, num_inter_experts=args.inter, num_shared_experts=1,
        num_null_experts=0, num_experts_per_tok=args.top_k, max_position_embeddings=max(512, args.seq),
        pad_token_id=0, eos_token_id=1,
    )


def _job(rank: int, args: argparse.Namespace, ep_size: int, port: int, out_path: str) -> None:
    """One rank of one timed job (run by torch.multiprocessing)."""
    os.environ.update(
        RANK=str(rank), WORLD_SIZE=str(WORLD_SIZE), LOCAL_RANK=str(rank),
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
    )
    import torch
    import torch.distributed as dist

    from omni_moe.modeling.modeling_omni import OmniMoeForCausalLM
    from omni_moe.training.distributed import init_distributed, teardown
    from omni_moe.training.deepspeed_moe import install_moe_markers, prepare_expert_parallel, tag_expert_parameters
    from omni_moe.training.engine import build_deepspeed_config, initialize_engine

    torch.set_num_threads(1)
    init_distributed(timeout_s=120)
    config = _bench_config(args)
    torch.manual_seed(0)
    model = OmniMoeForCausalLM(config)
    ds_config = build_deepspeed_config(micro_batch_size=args.micro, zero_stage=args.zero, lr=1e-4, gradient_clipping=1.0)
    layout = prepare_expert_parallel(model, ep_size, timeout_s=120)
    tag_expert_parameters(model, ep_size)
    install_moe_markers(model, ep_size)
    engine = initialize_engine(model, ds_config, layout).engine  # constant lr: the schedule does not change step time
    gen = torch.Generator().manual_seed(rank)
    times = []
    for step in range(args.warmup + args.steps):
        input_ids = torch.randint(2, config.vocab_size, (args.micro, args.seq), generator=gen)
        modality_ids = torch.randint(0, config.num_modalities, (args.micro, 1), generator=gen).expand_as(input_ids)
        dist.barrier()
        start = time.perf_counter()
        loss = engine(input_ids=input_ids, labels=input_ids, modality_ids=modality_ids.contiguous()).loss
        engine.backward(loss)
        engine.step()
        dist.barrier()
        if step >= args.warmup:
            times.append(time.perf_counter() - start)
    if rank == 0:
        Path(out_path).write_text(json.dumps({"ep_size": ep_size, "times": times}))
    teardown()


def run_job(args: argparse.Namespace, ep_size: int) -> float:
    """Median step time (s) of one 2-process job."""
    import torch.multiprocessing as mp

    from omni_moe.training.distributed import free_port

    os.environ["OMP_NUM_THREADS"] = "1"  # inherited by the spawned ranks before torch initialises its pool
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "result.json")
        mp.start_processes(_job, args=(args, ep_size, free_port(), out), nprocs=WORLD_SIZE, start_method="spawn")
        return statistics.median(json.loads(Path(out).read_text())["times"])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=12, help="timed steps per job")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps per job")
    parser.add_argument("--rounds", type=int, default=2, help="alternating EP=1 / EP=2 job pairs")
    parser.add_argument("--zero", type=int, default=1, choices=(0, 1, 2))
    parser.add_argument("--micro", type=int, default=4, help="sequences per rank per step")
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--ffn", type=int, default=256)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--intra", type=int, default=2, help="intra experts per modality (4 modalities)")
    parser.add_argument("--inter", type=int, default=2)
    parser.add_argument("--top-k", type=int, default=2)
    args = parser.parse_args(argv)

    load_before = os.getloadavg()[0]
    medians: dict[int, list[float]] = {1: [], 2: []}
    for _ in range(args.rounds):
        for ep_size in (1, 2):
            medians[ep_size].append(run_job(args, ep_size))
    ep1, ep2 = statistics.median(medians[1]), statistics.median(medians[2])
    experts = 4 * args.intra + args.inter
    print(
        f"EP benchmark: {WORLD_SIZE} ranks (gloo, loopback, 1 thread each), ZeRO-{args.zero}, fp32; "
        f"{args.layers} MoE layers, hidden {args.hidden}, ffn {args.ffn}, {experts} routed experts, top-{args.top_k}; "
        f"{args.micro} x {args.seq} tokens per rank per step; {args.steps} timed steps x {args.rounds} rounds"
    )
    print("\n| layout | step ms (median) | per-round medians | vs EP=1 |\n|---|---:|---|---:|")
    for ep_size, value in ((1, ep1), (2, ep2)):
        rounds = ", ".join(f"{1000 * t:.1f}" for t in medians[ep_size])
        print(f"| EP={ep_size} | {1000 * value:.1f} | {rounds} | {value / ep1:.2f} |")
    print(f"\nload average (1 min) before/after: {load_before:.2f} / {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs")


if __name__ == "__main__":
    main()
