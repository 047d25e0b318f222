"""The dry run's cost model (training/cost_model.py): FLOPs per token, all-to-all bytes, step-time lower bound.

A tiny config's FLOPs are written out here by hand from its shapes, independently of the module; the rest checks
the documented dependence on EP size, checkpointing, placement and the stated hardware, and the report's lines.
"""

from __future__ import annotations

import pytest

from omni_moe.modeling.configuration_omni import OmniMoeConfig
from omni_moe.training.cost_model import Hardware, all_to_all_bytes_per_token, forward_flops_per_token, stage_cost
from tests.unit.test_dry_run import RECIPE, overrides, recipe_with  # noqa: F401 (fixtures)

# h 64, 4 heads x 16, 2 KV heads, vocab 100; layer 0 dense (I 128), layer 1 MoE: 2 intra x 4 modalities + 2 inter
# routed experts of F 32, top-2, 1 null column, a shared expert of 48
CONFIG = dict(vocab_size=100, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, moe_layers=[1], num_intra_experts=2, num_inter_experts=2, num_null_experts=1,
              num_shared_experts=1, moe_intermediate_size=32, shared_expert_intermediate_size=48,
              num_experts_per_tok=2)


def by_hand(row_tokens: int) -> float:
    h, q, kv = 64, 4 * 16, 2 * 16
    attention = h * q + 2 * h * kv + q * h
    dense = attention + 3 * h * 128
    moe = attention + 2 * 3 * h * 32 + (3 * h * 48 + h) + h * (2 * 4 + 2 + 1)  # top-2, shared + its gate, router
    head = h * 100
    return 2 * (dense + moe + head) + 4 * 2 * q * (row_tokens + 1) / 2


def test_forward_flops_per_token_by_hand():
    config = OmniMoeConfig(**CONFIG)
    for row in (1, 7, 512):
        assert forward_flops_per_token(config, row) == pytest.approx(by_hand(row), rel=1e-12)
    # a second MoE layer adds exactly one MoE layer's matmuls, whatever its routed-expert count beyond top-k
    more = OmniMoeConfig(**{**CONFIG, "num_inter_experts": 6})
    assert forward_flops_per_token(more, 7) == forward_flops_per_token(config, 7) + 2 * 64 * 4  # 4 more router columns


def test_all_to_all_bytes_follow_ep_size_precision_and_checkpointing():
    config = OmniMoeConfig(**CONFIG)
    assert all_to_all_bytes_per_token(config, 1, "bf16", False) == 0.0
    assert all_to_all_bytes_per_token(config, 2, "bf16", False) == 4 * 2 * 64 * 2 * 1 / 2
    assert all_to_all_bytes_per_token(config, 4, "fp32", True) == 6 * 2 * 64 * 4 * 3 / 4


def cost(**overrides):
    settings = dict(row_tokens=256, tokens_per_rank=4096, reduced_dense=10**6, reduced_expert=4 * 10**6,
                    world_size=16, ep_size=4, nproc_per_node=8, precision="bf16", checkpointing=False,
                    hardware=Hardware(peak_tflops=100.0, intra_node_gbps=200.0, inter_node_gbps=20.0))
    return stage_cost(OmniMoeConfig(**CONFIG), **{**settings, **overrides})


def test_step_bound_by_hand_and_its_placement_rules():
    c = cost()
    forward = by_hand(256)
    assert c.model_flops_per_token == pytest.approx(3 * forward) and c.executed_flops_per_token == c.model_flops_per_token
    assert c.compute_s == pytest.approx(4096 * 3 * forward / 100e12)
    assert c.all_to_all_s == pytest.approx(4096 * (4 * 2 * 64 * 2 * 3 / 4) * 1 / 200e9)  # EP 4 <= 8 per node: NVLink
    # 16 ranks on 8 per node: gradients cross nodes; dense over 16 ranks, experts over 16 / 4 = 4 replicas
    grads = 2 * 10**6 * 2 * 15 / 16 + 2 * 10**6 * 2 * 3 / 4
    assert c.gradient_s == pytest.approx(grads / 20e9)
    assert c.overlapped_s == max(c.compute_s, c.all_to_all_s + c.gradient_s)
    assert c.exposed_all_to_all_s == c.compute_s + c.all_to_all_s

    assert cost(ep_size=16).all_to_all_s > 10 * c.all_to_all_s  # an EP group spanning nodes uses the slow links
    assert cost(world_size=8, ep_size=4).gradient_s < c.gradient_s  # one node: no inter-node gradient traffic
    checkpointed = cost(checkpointing=True)
    assert checkpointed.executed_flops_per_token == pytest.approx(4 * forward)
    assert checkpointed.model_flops_per_token == c.model_flops_per_token
    assert checkpointed.all_to_all_s == pytest.approx(1.5 * c.all_to_all_s)


def test_hardware_from_the_environment(monkeypatch):
    monkeypatch.delenv("OMNI_PEAK_TFLOPS", raising=False)
    assert Hardware.from_environment() == Hardware()
    monkeypatch.setenv("OMNI_PEAK_TFLOPS", "312")
    monkeypatch.setenv("OMNI_INTER_NODE_GBPS", "25")
    assert Hardware.from_environment() == Hardware(peak_tflops=312.0, inter_node_gbps=25.0)
    for bad in ("fast", "0", "-3"):
        monkeypatch.setenv("OMNI_PEAK_TFLOPS", bad)
        with pytest.raises(ValueError, match=f"OMNI_PEAK_TFLOPS='{bad}' must be a positive number"):
            Hardware.from_environment()


def test_the_dry_run_prints_the_cost_per_stage_at_the_stated_hardware(recipe_with, monkeypatch):  # noqa: F811
    from omni_moe.training.dry_run import dry_run_report

    monkeypatch.setenv("NNODES", "4")
    monkeypatch.setenv("OMNI_PEAK_TFLOPS", "500")
    report = dry_run_report(recipe_with())
    assert "at 500 TFLOPS peak, 450 GB/s intra-node, 50 GB/s inter-node" in report
    lines = report.splitlines()
    for stage in ("alignment", "modality_experts", "mixed_lora"):
        at = next(i for i, line in enumerate(lines) if line.startswith(f"  stage {stage}: trains"))
        block = "\n".join(lines[at:at + 4])
        assert "flops per token: model" in block and "KiB per token per MoE layer" in block
        assert "step lower bound (16,384 tokens per rank)" in block  # 1 x 4096 tokens x 4 accumulation steps
    halved = dry_run_report(recipe_with("train.gradient_accumulation_steps=2"))
    assert "step lower bound (8,192 tokens per rank)" in halved
