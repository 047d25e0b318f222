"""GPU benchmarks of `launch/gpu_check.sh`: the MoE layer against transformers' grouped_mm experts, and a training
step of a ~1 B-active omni-MoE model with its MFU. Written for CUDA and bf16; `--preset tiny --device cpu` runs the
same code on a toy size so CI can check it.

    python -m omni.benchmarks.gpu --out gpu_report            # on a GPU: both benchmarks, report.json + report.md
    python -m omni.benchmarks.gpu --preset tiny --device cpu --dtype fp32 --out /tmp/gpu_smoke   # CPU smoke run

moe   our OmniSparseMoeBlock (one text pool of the preset's routed experts, top-k renormalised, a gated shared
      expert) vs transformers' Qwen2MoeSparseMoeBlock of the same sizes with `experts_implementation="grouped_mm"`:
      forward + backward, medians of timed repetitions interleaved between the two (noise hits both alike).
step  forward + backward + AdamW step of OmniMoeForCausalLM on random text tokens (labels = inputs), activation
      checkpointing on, weights in the run's dtype. Model FLOPs per token come from the dry run's cost model
      (`training/cost_model.py`: 3 x the forward FLOPs of the active path -- top-k routed experts only -- plus
      attention), so MFU = tokens/s x model FLOPs per token / the card's peak (`--peak-tflops`, or looked up from
      the device name: H100/H200 SXM 989 bf16 dense, H100 PCIe 756, A100 312). Peak memory is the CUDA
      allocator's maximum (on the CPU: the process's maximum resident set).
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import sys
import time
from pathlib import Path

import torch

from omni_moe.modeling.configuration_omni import OmniMoeConfig
from omni_moe.modeling.modeling_omni import OmniMoeForCausalLM
from omni_moe.modeling.moe import OmniSparseMoeBlock
from omni_moe.training.cost_model import active_matmul_weights, forward_flops_per_token

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
# ~1.1 B active of 2.8 B parameters: 16 layers of width 2048 (16 heads of 128, 8 KV heads), every layer MoE with
# 2 intra experts per modality + 8 inter experts of FFN 1408, top-4, one shared expert of 2816; vocab 32768.
PRESETS = {
    "1b": dict(model=dict(vocab_size=32768, hidden_size=2048, intermediate_size=5632, num_hidden_layers=16,
                          num_attention_heads=16, num_key_value_heads=8, moe_intermediate_size=1408,
                          shared_expert_intermediate_size=2816, num_intra_experts=2, num_inter_experts=8,
                          num_shared_experts=1, num_null_experts=0, num_experts_per_tok=4,
                          max_position_embeddings=4096),
               batch=8, seq=2048, moe_tokens=16384),
    "tiny": dict(model=dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=2, moe_intermediate_size=32,
                            shared_expert_intermediate_size=64, num_intra_experts=2, num_inter_experts=2,
                            num_shared_experts=1, num_null_experts=0, num_experts_per_tok=2),
                 batch=2, seq=32, moe_tokens=256),
}
PEAK_TFLOPS_BF16 = (("H100 PCIe", 756.0), ("H100", 989.0), ("H200", 989.0), ("GH200", 989.0), ("A100", 312.0))


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({platform.processor() or 'cpu'})"


def peak_tflops(name: str, given: float | None) -> float | None:
    if given is not None:
        return given
    return next((tflops for key, tflops in PEAK_TFLOPS_BF16 if key in name), None)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_memory_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def timed(fn, device: torch.device, repeats: int) -> list[float]:
    samples = []
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        fn()
        synchronize(device)
        samples.append(time.perf_counter() - start)
    return samples


# ----------------------------------------------------------------------------------------------- moe layer
def moe_layer(preset: dict, device: torch.device, dtype: torch.dtype, repeats: int) -> dict:
    """Our MoE block vs transformers' Qwen2-MoE block (grouped_mm experts), forward + backward, same sizes."""
    from transformers import Qwen2MoeConfig
    from transformers.models.qwen2_moe.modeling_qwen2_moe import Qwen2MoeSparseMoeBlock

    m = preset["model"]
    experts = m["num_inter_experts"] + m["num_intra_experts"] * 4
    ours_config = OmniMoeConfig(**{**m, "modalities": ["text"], "num_intra_experts": 0, "num_inter_experts": experts,
                                   "num_hidden_layers": 1, "norm_topk_prob": True})
    theirs_config = Qwen2MoeConfig(hidden_size=m["hidden_size"], moe_intermediate_size=m["moe_intermediate_size"],
                                   shared_expert_intermediate_size=m["shared_expert_intermediate_size"],
                                   num_experts=experts, num_experts_per_tok=m["num_experts_per_tok"],
                                   norm_topk_prob=True, num_attention_heads=m["num_attention_heads"])
    theirs_config._experts_implementation = "grouped_mm"
    torch.manual_seed(0)
    ours = OmniSparseMoeBlock(ours_config).to(device=device, dtype=dtype)
    theirs = Qwen2MoeSparseMoeBlock(theirs_config).to(device=device, dtype=dtype)
    x = torch.randn(1, preset["moe_tokens"], m["hidden_size"], device=device, dtype=dtype, requires_grad=True)
    modality = torch.zeros(1, preset["moe_tokens"], dtype=torch.long, device=device)
    grad = torch.randn_like(x)

    def step(module, forward):
        def run():
            module.zero_grad(set_to_none=True)
            x.grad = None
            out = forward()
            (out[0] if isinstance(out, tuple) else out).backward(grad)
        return run

    variants = {"ours": step(ours, lambda: ours(x, modality)), "transformers-grouped_mm": step(theirs, lambda: theirs(x))}
    for run in variants.values():  # warm-up (kernel selection, allocator)
        run()
        run()
    samples: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(repeats):
        for name, run in variants.items():
            samples[name] += timed(run, device, 1)
    medians = {name: statistics.median(s) for name, s in samples.items()}
    return {"tokens": preset["moe_tokens"], "experts": experts, "top_k": m["num_experts_per_tok"],
            "ms": {name: 1e3 * s for name, s in medians.items()},
            "speedup_vs_transformers": medians["transformers-grouped_mm"] / medians["ours"]}


# ----------------------------------------------------------------------------------------------- training step
def training_step(preset: dict, device: torch.device, dtype: torch.dtype, repeats: int, peak: float | None) -> dict:
    config = OmniMoeConfig(**preset["model"])
    torch.manual_seed(0)
    model = OmniMoeForCausalLM(config).to(device=device, dtype=dtype).train()
    # transformers 5.25 renamed gradient_checkpointing_enable (the old name warns)
    (getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable)()
    if not model.model.gradient_checkpointing:
        raise RuntimeError("activation checkpointing did not turn on: the step would measure another model")
    fused = {"fused": True} if device.type == "cuda" else {}
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, **fused)
    batch = torch.randint(0, config.vocab_size, (preset["batch"], preset["seq"]), device=device)

    def step():
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step()  # warm-up
    step()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    seconds = statistics.median(timed(step, device, repeats))
    tokens = preset["batch"] * preset["seq"]
    model_flops = 3 * forward_flops_per_token(config, preset["seq"])
    achieved = tokens / seconds * model_flops / 1e12
    return {"parameters": sum(p.numel() for p in model.parameters()),
            "active_matmul_weights": active_matmul_weights(config), "tokens_per_step": tokens,
            "ms_per_step": 1e3 * seconds, "tokens_per_s": tokens / seconds,
            "model_gflop_per_token": model_flops / 1e9, "achieved_tflops": achieved,
            "mfu": achieved / peak if peak else None, "peak_memory_gib": peak_memory_bytes(device) / 2**30}


def markdown(report: dict) -> str:
    lines = [f"# GPU check: {report['device']}", "",
             f"torch {report['torch']}, {report['dtype']}, preset {report['preset']}, peak "
             f"{report['peak_tflops'] or 'unknown'} TFLOPS", ""]
    moe = report.get("moe")
    if moe:
        lines += [f"## MoE layer ({moe['tokens']} tokens, {moe['experts']} experts, top-{moe['top_k']}, fwd+bwd)", "",
                  "| variant | ms |", "|---|---:|"]
        lines += [f"| {name} | {ms:.3f} |" for name, ms in moe["ms"].items()]
        lines += ["", f"ours vs transformers grouped_mm: **{moe['speedup_vs_transformers']:.2f}x** (goal >= 1.2x)", ""]
    step = report.get("step")
    if step:
        mfu = f"{100 * step['mfu']:.1f} %" if step["mfu"] is not None else "n/a (peak unknown: --peak-tflops)"
        lines += ["## Training step", "", "| metric | value |", "|---|---:|",
                  f"| parameters | {step['parameters']:,} |",
                  f"| active matmul weights per token | {step['active_matmul_weights']:,} |",
                  f"| tokens per step | {step['tokens_per_step']:,} |", f"| ms per step | {step['ms_per_step']:.1f} |",
                  f"| tokens/s | {step['tokens_per_s']:,.0f} |",
                  f"| model GFLOP per token | {step['model_gflop_per_token']:.3f} |",
                  f"| achieved TFLOPS | {step['achieved_tflops']:.2f} |", f"| MFU | {mfu} (goal >= 40 %) |",
                  f"| peak memory | {step['peak_memory_gib']:.2f} GiB |"]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m omni.benchmarks.gpu", description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="folder for report.json and report.md")
    parser.add_argument("--preset", choices=sorted(PRESETS), default="1b")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--peak-tflops", type=float, default=None, help="the card's dense peak for --dtype")
    parser.add_argument("--only", choices=("moe", "step"), default=None, help="run one benchmark")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("omni.benchmarks.gpu: --device cuda but CUDA is not available (use --device cpu for the smoke run)",
              file=sys.stderr)
        return 2
    preset, dtype, name = PRESETS[args.preset], DTYPES[args.dtype], device_name(device)
    peak = peak_tflops(name, args.peak_tflops) if args.dtype == "bf16" or args.peak_tflops else None
    report = {"device": name, "torch": torch.__version__, "dtype": args.dtype, "preset": args.preset,
              "peak_tflops": peak}
    if args.only in (None, "moe"):
        report["moe"] = moe_layer(preset, device, dtype, args.repeats)
    if args.only in (None, "step"):
        report["step"] = training_step(preset, device, dtype, args.repeats, peak)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "report.md").write_text(markdown(report))
    print(markdown(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
