"""The dry run's cost model: FLOPs per token, all-to-all bytes per token and a step-time lower bound, per stage.

    omni train recipes/real_scale.yaml --dry-run                      # H100 SXM defaults, stated in the report
    OMNI_PEAK_TFLOPS=312 OMNI_INTRA_NODE_GBPS=300 OMNI_INTER_NODE_GBPS=25 omni train RECIPE --dry-run   # A100-class

Everything is read off the model config and the recipe; nothing is measured. The formulas (docs/launch.md,
"Cost model of the dry run", explains how to read them), per text token through the LLM (media towers excluded):

    forward FLOPs    2 x (active matmul weights) + 4 x L x (heads x head_dim) x c
                     active matmul weights: q/k/v/o, per MoE layer top-k routed experts (3 h F each) + the shared
                     expert (3 h Fs) + the router (h x columns), per dense layer 3 h I, and the LM head (h V);
                     c = (T + 1) / 2, the mean causal context of a T-token row (QK^T and AV, 2 FLOPs a multiply-add)
    model FLOPs      3 x forward (backward = 2 x forward); the convention MFU is quoted in, whatever is frozen
    executed FLOPs   + 1 x forward with activation checkpointing (the recomputed forward)
    all-to-all       per MoE layer: k slots x h x b bytes leave the rank with probability (E - 1) / E under balanced
                     routing over E = EP ranks, once to dispatch and once to combine; the backward repeats both,
                     and activation checkpointing repeats the forward pair: 4 (or 6) x k x h x b x (E - 1) / E
    gradients        ring all-reduce / reduce-scatter + all-gather: each rank sends 2 x G x (N - 1) / N bytes a step,
                     G = trained gradient bytes in the model's precision, N = the data-parallel size (W for dense
                     parameters, W / E for routed-expert parameters)
    step lower bound max(compute, communication) -- perfect overlap -- and compute + all-to-all -- the all-to-all
                     on the critical path, gradients hidden behind the backward -- at the stated peak and bandwidths

The all-to-all runs over the intra-node links when an EP group fits in a node (EP <= processes per node, the
placement of training/expert_parallel.py), else over the inter-node links; gradients cross nodes when there are
several. A bound, not a prediction: real steps add kernel launch gaps, imbalance, stragglers and the media towers.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

# H100 SXM: 989 TFLOPS dense bf16 (fp32 matmuls as TF32: 495), NVLink 4 at 450 GB/s a direction, one 400 Gb/s
# InfiniBand NIC per GPU (50 GB/s). Each can be overridden from the environment (the variable's name in brackets).
DEFAULT_PEAK_TFLOPS = 989.0  # [OMNI_PEAK_TFLOPS]
DEFAULT_INTRA_NODE_GBPS = 450.0  # [OMNI_INTRA_NODE_GBPS] GB/s a direction per GPU
DEFAULT_INTER_NODE_GBPS = 50.0  # [OMNI_INTER_NODE_GBPS] GB/s a direction per GPU


@dataclass(frozen=True)
class Hardware:
    peak_tflops: float = DEFAULT_PEAK_TFLOPS
    intra_node_gbps: float = DEFAULT_INTRA_NODE_GBPS
    inter_node_gbps: float = DEFAULT_INTER_NODE_GBPS

    @classmethod
    def from_environment(cls) -> Hardware:
        """The defaults, each overridden by its environment variable; a bad value is an error naming it."""
        values = {}
        for name, field in (("OMNI_PEAK_TFLOPS", "peak_tflops"), ("OMNI_INTRA_NODE_GBPS", "intra_node_gbps"),
                            ("OMNI_INTER_NODE_GBPS", "inter_node_gbps")):
            text = os.environ.get(name)
            if not text:
                continue
            try:
                value = float(text)
            except ValueError:
                value = -1.0
            if not value > 0:
                raise ValueError(f"{name}={text!r} must be a positive number")
            values[field] = value
        return cls(**values)

    def line(self) -> str:
        return (f"{self.peak_tflops:g} TFLOPS peak, {self.intra_node_gbps:g} GB/s intra-node, "
                f"{self.inter_node_gbps:g} GB/s inter-node (per GPU, a direction)")


def active_matmul_weights(config) -> int:
    """The weights a text token multiplies by in one forward pass (the LM head included, embeddings excluded)."""
    h = config.hidden_size
    q_out, kv_out = config.num_attention_heads * config.head_dim, config.num_key_value_heads * config.head_dim
    attention = h * q_out + 2 * h * kv_out + q_out * h
    total = h * config.vocab_size
    for index in range(config.num_hidden_layers):
        if config.is_moe_layer(index):
            routed = min(config.num_experts_per_tok, config.num_routed_experts) * 3 * h * config.moe_intermediate_size
            shared = 3 * h * config.shared_mlp_intermediate_size + h if config.num_shared_experts else 0
            total += attention + routed + shared + h * config.num_router_columns
        else:
            total += attention + 3 * h * config.intermediate_size
    return total


def forward_flops_per_token(config, row_tokens: int) -> float:
    """Forward FLOPs of one text token in a causal row of `row_tokens` tokens."""
    mean_context = (row_tokens + 1) / 2
    attention = 4 * config.num_hidden_layers * config.num_attention_heads * config.head_dim * mean_context
    return 2 * active_matmul_weights(config) + attention


def all_to_all_bytes_per_token(config, ep_size: int, precision: str, checkpointing: bool) -> float:
    """Bytes one token sends through the expert-parallel all-to-all in one MoE layer over a training step."""
    if ep_size <= 1:
        return 0.0
    slots = min(config.num_experts_per_tok, config.num_routed_experts)
    b = 4 if precision == "fp32" else 2
    passes = 6 if checkpointing else 4
    return passes * slots * config.hidden_size * b * (ep_size - 1) / ep_size


@dataclass(frozen=True)
class StageCost:
    model_flops_per_token: float
    executed_flops_per_token: float
    all_to_all_bytes_per_token_layer: float
    compute_s: float
    all_to_all_s: float
    gradient_s: float

    @property
    def overlapped_s(self) -> float:
        return max(self.compute_s, self.all_to_all_s + self.gradient_s)

    @property
    def exposed_all_to_all_s(self) -> float:
        return self.compute_s + self.all_to_all_s

    def lines(self, tokens_per_rank: int) -> list[str]:
        return [
            (f"flops per token: model {self.model_flops_per_token / 1e9:,.2f} GFLOP (3 x forward), executed "
             f"{self.executed_flops_per_token / 1e9:,.2f} GFLOP; all-to-all "
             f"{self.all_to_all_bytes_per_token_layer / 1024:,.2f} KiB per token per MoE layer"),
            (f"step lower bound ({tokens_per_rank:,} tokens per rank): compute {self.compute_s * 1e3:,.1f} ms, "
             f"all-to-all {self.all_to_all_s * 1e3:,.1f} ms, gradients {self.gradient_s * 1e3:,.1f} ms -> "
             f"{self.overlapped_s * 1e3:,.1f} ms with perfect overlap, {self.exposed_all_to_all_s * 1e3:,.1f} ms "
             f"with the all-to-all exposed"),
        ]


def stage_cost(config, *, row_tokens: int, tokens_per_rank: int, reduced_dense: int, reduced_expert: int,
               world_size: int, ep_size: int, nproc_per_node: int, precision: str, checkpointing: bool,
               hardware: Hardware) -> StageCost:
    """The cost of one optimizer step of a stage on one rank. `reduced_dense` / `reduced_expert`: the parameters whose
    gradients the step reduces over data-parallel ranks (`reduced_expert` counts every EP rank's experts)."""
    forward = forward_flops_per_token(config, row_tokens)
    model = 3 * forward
    executed = model + (forward if checkpointing else 0.0)
    a2a = all_to_all_bytes_per_token(config, ep_size, precision, checkpointing)
    moe_layers = sum(config.is_moe_layer(i) for i in range(config.num_hidden_layers))
    a2a_gbps = hardware.intra_node_gbps if ep_size <= nproc_per_node else hardware.inter_node_gbps
    grad_gbps = hardware.inter_node_gbps if world_size > nproc_per_node else hardware.intra_node_gbps
    b = 4 if precision == "fp32" else 2

    def ring(count: float, group: int) -> float:
        return 2 * count * b * (group - 1) / group if group > 1 else 0.0

    gradient_bytes = ring(reduced_dense, world_size) + ring(reduced_expert / ep_size, world_size // ep_size)
    return StageCost(
        model_flops_per_token=model, executed_flops_per_token=executed, all_to_all_bytes_per_token_layer=a2a,
        compute_s=tokens_per_rank * executed / (hardware.peak_tflops * 1e12),
        all_to_all_s=tokens_per_rank * a2a * moe_layers / (a2a_gbps * 1e9),
        gradient_s=gradient_bytes / (grad_gbps * 1e9))
