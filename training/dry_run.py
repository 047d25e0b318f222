"""`omni train RECIPE --dry-run`: what a recipe trains and what every rank will hold, without loading a weight.

    omni train recipes/real_scale.yaml --dry-run
    NNODES=4 omni train recipes/real_scale.yaml --dry-run parallel.zero_stage=1 parallel.ep_size=4

Only config.json files are read: the dense LLM's and the encoders' for `model.upcycle`, the folder's for
`model.from`. The model is built on PyTorch's meta device (shapes, no storage); each stage's trainable set comes from
the code the run itself uses (`omni_moe.training.stage_spec` presets, `omni_moe.training.freeze`: LoRA, freezing). The report holds the resolved recipe, the
data plan, total and active parameter counts by component, the expert layout (pools, global ids per EP rank) and,
per stage, a per-rank memory estimate. World size = NNODES (environment, as for launch/torchrun.sh; default 1) x
run.nproc_per_node.

Memory model, bytes per rank (docs/launch.md has the derivation). P = parameters, Pt = trainable parameters; dense
parameters are replicated on all W ranks, routed experts split over E = EP size ranks and replicated over W / E
expert-data-parallel ranks; "N" is W for dense and W / E for expert parameters:
    weights      P x b                   b = 4 (fp32) or 2 (bf16); frozen parameters included
    gradients    Pt x g  (/ N at ZeRO-2)  g = 4 (fp32, or bf16 at ZeRO 1/2: fp32 gradient accumulation), 2 (bf16 ZeRO-0)
    optimizer    Pt x o  / N              o = 8 (AdamW moments) or 12 (bf16: + fp32 master weights);
                                          not partitioned only at ZeRO-0 fp32 (a plain torch AdamW per rank)
    activations  T x b x (sum over layers of a_layer) + logits     T = tokens per micro-batch
                 with activation checkpointing: T x b x (L x h + max a_layer) + logits  (layer inputs kept, one
                 layer recomputed at a time)
                 a_layer = 6h + 2 kv + k (2h + 3F) + 3 Fs  (MoE layer: norms, q/k/v, attention output, per routed
                 slot the gathered input, gate/up, activation and output, the shared expert), 6h + 2 kv + 3 I (dense)
                 logits = T x V x (b + 4)  (model-dtype logits and their fp32 copy for the loss)
Media encoders' activations are left out (frozen towers keep none); routing is assumed balanced over EP ranks.

Per stage it also prints the cost model of `training/cost_model.py`: FLOPs per token, all-to-all bytes per token per MoE
layer and a step-time lower bound at a stated peak TFLOPS and link bandwidths (OMNI_PEAK_TFLOPS,
OMNI_INTRA_NODE_GBPS, OMNI_INTER_NODE_GBPS; H100 SXM by default).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from .build import ModelPlan, plan_model, quiet_transformers
from .build import meta_model as meta_model_of
from .cost_model import Hardware, stage_cost
from .recipe import Recipe, RecipeError

GIB = 1024**3
TOWERS = ("vision_encoder", "audio_encoder", "image_projector", "audio_projector")
EXPERT_COMPONENTS = ("routed_experts", "expert_lora")


# ----------------------------------------------------------------------------- the model, from config files only
def resolve_model_config(recipe: Recipe, stage=None):
    """(OmniMoeConfig, where it came from) of the model a stage trains: the run's own plan (training/build.py),
    from config.json files only. Without a stage: the first MoE stage's model."""
    if stage is None:
        stage = next((s for s in recipe.stages if s.preset != "dense_pretrain"), recipe.stages[0])
    with quiet_transformers():
        plan = plan_model(recipe, stage)
    return plan.config, plan.origin


def meta_model(config):
    """The model with every tensor on the meta device: real shapes, no memory, no initialisation cost."""
    return meta_model_of(ModelPlan("config", config, ""))


def component_of(name: str) -> str:
    """The component a (canonical) parameter name belongs to, for the counts."""
    if name.startswith("media."):
        return name.split(".")[1]
    if "lora_" in name:
        return "expert_lora" if ".mlp.experts." in name else "lora"
    if "embed_tokens" in name or name.startswith("lm_head"):
        return "embeddings"
    if ".self_attn." in name:
        return "attention"
    if ".mlp.experts." in name:
        return "routed_experts"
    if ".mlp.gate." in name:
        return "routers"
    if ".mlp.shared_expert" in name:
        return "shared_experts"
    if ".mlp." in name:
        return "dense_mlp"
    return "norms"


@dataclass(frozen=True)
class ParameterCounts:
    total: int
    active: int  # per text token: all but the routed experts a token does not pick and the media towers
    by_component: dict[str, int]
    per_expert: int  # one routed expert of one MoE layer
    moe_layers: int

    @property
    def expert(self) -> int:
        return sum(self.by_component.get(c, 0) for c in EXPERT_COMPONENTS)

    @property
    def dense(self) -> int:
        return self.total - self.expert


def count_parameters(model, config) -> ParameterCounts:
    """Counts of a (meta, possibly PEFT-wrapped) model of `config`; tied weights counted once."""
    from omni_moe.training.expert_parallel import grouped_experts, moe_blocks
    from omni_moe.training.lora import canonical_param_name

    by_component: dict[str, int] = {}
    for name, param in model.named_parameters():
        component = component_of(canonical_param_name(name))
        by_component[component] = by_component.get(component, 0) + param.numel()
    blocks = moe_blocks(model)
    per_expert, inactive = 0, 0
    for block in blocks:
        experts = grouped_experts(block)
        per_expert = (experts.gate_up_proj.numel() + experts.down_proj.numel()) // experts.num_experts
        inactive += per_expert * (experts.num_experts - min(config.num_experts_per_tok, experts.num_experts))
    total = sum(by_component.values())
    towers = sum(by_component.get(t, 0) for t in TOWERS)
    return ParameterCounts(total=total, active=total - towers - inactive, by_component=by_component,
                           per_expert=per_expert, moe_layers=len(blocks))


# ----------------------------------------------------------------------------- memory
@dataclass(frozen=True)
class MemoryEstimate:
    weights: int
    gradients: int
    optimizer: int
    activations: int
    notes: tuple[str, ...] = field(default=())

    @property
    def total(self) -> int:
        return self.weights + self.gradients + self.optimizer + self.activations

    def line(self) -> str:
        parts = [f"{name} {human_bytes(getattr(self, name))}" for name in
                 ("weights", "gradients", "optimizer", "activations")]
        return f"{', '.join(parts)} -> total {human_bytes(self.total)}"


def human_bytes(n: float) -> str:
    for unit, size in (("GiB", GIB), ("MiB", 1024**2), ("KiB", 1024)):
        if n >= size:
            return f"{n / size:,.2f} {unit}"
    return f"{n:,.0f} B"


def state_bytes(dense: int, expert: int, dense_trainable: int, expert_trainable: int, *, world_size: int,
                ep_size: int, zero_stage: int, precision: str) -> tuple[int, int, int]:
    """(weights, gradients, optimizer) bytes on one rank; `expert*` count every routed expert (all EP ranks)."""
    if world_size % ep_size or zero_stage not in (0, 1, 2) or precision not in ("fp32", "bf16"):
        raise ValueError(f"state_bytes: world {world_size}, EP {ep_size}, ZeRO-{zero_stage}, {precision} unsupported")
    weight_b = 4 if precision == "fp32" else 2
    grad_b = 2 if (precision == "bf16" and zero_stage == 0) else 4
    optim_b = 8 if precision == "fp32" else 12
    local_expert, local_expert_trainable = expert / ep_size, expert_trainable / ep_size
    dense_dp, expert_dp = world_size, world_size // ep_size
    grad_split = (dense_dp, expert_dp) if zero_stage == 2 else (1, 1)
    optim_split = (1, 1) if (zero_stage == 0 and precision == "fp32") else (dense_dp, expert_dp)
    weights = (dense + local_expert) * weight_b
    gradients = dense_trainable * grad_b / grad_split[0] + local_expert_trainable * grad_b / grad_split[1]
    optimizer = dense_trainable * optim_b / optim_split[0] + local_expert_trainable * optim_b / optim_split[1]
    return round(weights), round(gradients), round(optimizer)


def activation_bytes(config, tokens: int, precision: str, checkpointing: bool) -> int:
    """Activations kept for backward by the LLM for `tokens` tokens per micro-batch (formula in the docstring)."""
    h, kv = config.hidden_size, config.num_key_value_heads * config.head_dim
    b = 4 if precision == "fp32" else 2
    per_layer = []
    for index in range(config.num_hidden_layers):
        if config.is_moe_layer(index):
            shared = 3 * config.shared_mlp_intermediate_size if config.num_shared_experts else 0
            per_layer.append(6 * h + 2 * kv + config.num_experts_per_tok * (2 * h + 3 * config.moe_intermediate_size)
                             + shared)
        else:
            per_layer.append(6 * h + 2 * kv + 3 * config.intermediate_size)
    kept = config.num_hidden_layers * h + max(per_layer) if checkpointing else sum(per_layer)
    return tokens * b * kept + tokens * config.vocab_size * (b + 4)


def tokens_per_micro_batch(recipe: Recipe) -> tuple[int, str]:
    """Tokens in one rank's micro-batch: batching.max_tokens, else batch_size x max_length."""
    batching = recipe.data.batching
    if batching.get("max_tokens"):
        return int(batching["max_tokens"]), f"max_tokens {batching['max_tokens']}"
    length = batching.get("max_length") or recipe.data.max_length
    if not length:
        raise RecipeError(f"{recipe.path}: the dry run needs data.max_length (or data.batching.max_tokens) to "
                          "estimate activation memory")
    size = int(batching.get("batch_size") or 1)
    return size * int(length), f"{size} x {length}"


def stage_memory(recipe: Recipe, stage, config, world_size: int) -> tuple[MemoryEstimate, dict[str, int]]:
    """Per-rank memory of one stage (the meta model with the stage's LoRA and freezing applied) and the parameters
    it trains: {"dense": n, "expert": n, "reduced_expert": n} (expert: routed experts and their LoRA factors, all EP
    ranks together; reduced_expert: the expert parameters whose gradients the step reduces, frozen ones kept in a MoE
    group included)."""
    import torch

    from omni_moe.training.freeze import apply_stage, prepare_model_for_stage

    with torch.device("meta"), quiet_transformers():  # PEFT would otherwise allocate and initialise the LoRA factors for real
        model = prepare_model_for_stage(meta_model(config), stage)
    plan = apply_stage(model, stage)
    plan.remove()  # only the plan's counts are needed
    counts = count_parameters(model, config)
    # the plan names trained expert rows by pool ("intra_experts:<modality>", "inter_experts") and lumps every LoRA
    # factor under "lora"; the experts' LoRA factors are split over EP ranks like the experts themselves
    trained_expert = sum(n for c, n in plan.trainable.items() if c.startswith(("intra_experts:", "inter_experts")))
    if "lora" in plan.trainable:
        trained_expert += counts.by_component.get("expert_lora", 0)
    trained = {"dense": sum(plan.trainable.values()) - trained_expert, "expert": trained_expert}
    held_expert, notes = trained_expert, []
    p = recipe.parallel
    if not plan.trainable_experts and counts.by_component.get("routed_experts") and (
            p.zero_stage in (1, 2) or p.precision == "bf16"):
        # the rule of training/parallelize.py: DeepSpeed's ZeRO-1/2 and bf16 optimizers assert a MoE group, so
        # a stage that trains no expert row keeps the (row-masked, never changing) expert tensors in the optimizer
        held_expert += counts.by_component["routed_experts"]
        notes.append(f"frozen routed experts ({counts.by_component['routed_experts']:,}) still hold gradients and "
                     f"optimizer state: training/parallelize.py keeps them in a MoE group for DeepSpeed")
    weights, grads, optim = state_bytes(counts.dense, counts.expert, trained["dense"], held_expert,
                                        world_size=world_size, ep_size=p.ep_size, zero_stage=p.zero_stage,
                                        precision=p.precision)
    tokens, _ = tokens_per_micro_batch(recipe)
    acts = activation_bytes(config, tokens, p.precision, recipe.train.activation_checkpointing)
    trained["reduced_expert"] = held_expert  # what the data-parallel gradient reduction moves
    return MemoryEstimate(weights, grads, optim, acts, tuple(notes)), trained


# ----------------------------------------------------------------------------- the report
def world_size_of(recipe: Recipe) -> tuple[int, int]:
    """(nodes, world size): NNODES from the environment x run.nproc_per_node."""
    text = os.environ.get("NNODES", "1") or "1"
    if not text.isdigit() or int(text) < 1:
        raise RecipeError(f"NNODES={text!r} must be a positive integer (the number of nodes of the planned job)")
    return int(text), int(text) * recipe.run.nproc_per_node


def _data_plan(recipe: Recipe, world: int) -> list[str]:
    batch = recipe.data.batching
    lines = ["data plan:"]
    for stage in recipe.stages:
        entries = stage.data or tuple({"source": n, "weight": 1.0} for n in recipe.data.sources)
        total = sum(float(e.get("weight", 1.0)) for e in entries)
        per_step = f"{batch.get('batch_size', '?')} x {recipe.train.gradient_accumulation_steps} x {world} ranks"
        lines.append(f"  stage {stage.name}: {stage.steps} steps, {per_step} samples per step "
                     f"({batch.get('strategy', 'mixed')} batching), trains {list(stage.train)}")
        for e in entries:
            paths = recipe.data.sources[e["source"]]
            for path in [paths] if isinstance(paths, str) else paths:
                index = Path(path) / "index.json"
                found = "NOT BUILT YET"
                if index.is_file():
                    info = json.loads(index.read_text())
                    found = f"{len(info['shards'])} shards, {info['num_samples']} samples"
                share = float(e.get("weight", 1.0)) / total
                lines.append(f"    {e['source']:<12} weight {share:6.1%}  {path} ({found})")
    return lines


def expert_layout(config, ep_size: int, world_size: int) -> list[str]:
    """Pools with global ids and the global ids every EP rank holds (placement of training/expert_parallel.py)."""
    from omni_moe.training.expert_parallel import check_ep_size, global_expert_ids

    moe_layers = sum(config.is_moe_layer(i) for i in range(config.num_hidden_layers))
    if not moe_layers:
        return ["experts: none (no MoE layer)"]
    try:
        check_ep_size(config.num_routed_experts, ep_size, world_size)
    except ValueError as exc:
        raise RecipeError(f"parallel.ep_size={ep_size}: {exc}") from None
    pools = config.expert_pools()
    pool_of = {g: name for name, ids in pools.items() for g in ids}
    shown = {name: f"{r.start}-{r.stop - 1}" for name, r in pools.items() if len(r)}
    lines = [(f"experts per MoE layer ({moe_layers} of {config.num_hidden_layers} layers): "
              f"{config.num_routed_experts} routed, pools {shown}; top-{config.num_experts_per_tok}"),
             (f"EP={ep_size}: {config.num_routed_experts // ep_size} experts per rank (global ids rank::{ep_size}), "
              f"each EP rank replicated on {world_size // ep_size} expert-data-parallel rank(s)")]
    for ep_rank in range(ep_size):
        ids = global_expert_ids(config.num_routed_experts, ep_rank, ep_size)
        lines.append(f"  EP rank {ep_rank}: " + ", ".join(f"{g} ({pool_of[g]})" for g in ids))
    return lines


def dry_run_report(recipe: Recipe) -> str:
    """Resolved config, data plan, parameter counts, expert layout and per-stage per-rank memory; no weights."""
    nodes, world = world_size_of(recipe)
    p = recipe.parallel
    lines = [f"# recipe {recipe.path} (overrides applied)", yaml.safe_dump(recipe.raw, sort_keys=False).rstrip(), ""]
    lines += _data_plan(recipe, world)
    config, origin = resolve_model_config(recipe)
    counts = count_parameters(meta_model(config), config)
    components = ", ".join(f"{name} {n:,}" for name, n in sorted(counts.by_component.items(), key=lambda kv: -kv[1]))
    lines += ["", f"model: {origin}",
              f"parameters: total {counts.total:,}, active per token {counts.active:,}",
              (f"  (active: a text token's path -- top-{config.num_experts_per_tok} of {config.num_routed_experts} "
               f"routed experts per MoE layer; media towers excluded: "
               f"{sum(counts.by_component.get(t, 0) for t in TOWERS):,})"),
              f"  by component: {components}"]
    lines += expert_layout(config, p.ep_size, world)
    tokens, how = tokens_per_micro_batch(recipe)
    hardware = Hardware.from_environment()
    row_tokens = int(recipe.data.batching.get("max_length") or recipe.data.max_length or tokens)
    tokens_per_rank = tokens * recipe.train.gradient_accumulation_steps
    lines += [(f"parallel: {nodes} node(s) x {recipe.run.nproc_per_node} processes = world {world}, "
               f"EP={p.ep_size}, ZeRO-{p.zero_stage}, {p.precision}, activation checkpointing "
               f"{'on' if recipe.train.activation_checkpointing else 'off'}, micro-batch {how} = {tokens:,} tokens"),
              "memory per rank (estimate; the model in training/dry_run.py and docs/launch.md) and cost per step "
              f"(training/cost_model.py) at {hardware.line()}:"]
    for stage in recipe.stages:
        stage_config = config if stage.preset != "dense_pretrain" else resolve_model_config(recipe, stage)[0]
        estimate, trained = stage_memory(recipe, stage, stage_config, world)
        lines.append(f"  stage {stage.name}: trains {trained['dense'] + trained['expert']:,} parameters "
                     f"({trained['expert']:,} in routed experts): {estimate.line()}")
        lines += [f"    note: {note}" for note in estimate.notes]
        cost = stage_cost(stage_config, row_tokens=row_tokens, tokens_per_rank=tokens_per_rank,
                          reduced_dense=trained["dense"], reduced_expert=trained["reduced_expert"], world_size=world,
                          ep_size=p.ep_size if stage.preset != "dense_pretrain" else 1,
                          nproc_per_node=recipe.run.nproc_per_node, precision=p.precision,
                          checkpointing=recipe.train.activation_checkpointing, hardware=hardware)
        lines += [f"    {line}" for line in cost.lines(tokens_per_rank)]
    # host memory: every rank builds (or loads) the whole model before expert parallelism keeps its share
    build = counts.total * (2 if p.precision == "bf16" else 4)
    lines.append(f"host memory at each stage's start: the whole model, {human_bytes(build)} per rank x "
                 f"{recipe.run.nproc_per_node} = {human_bytes(build * recipe.run.nproc_per_node)} a node (upcycling "
                 "peaks at ~1.4x: docs/performance.md, 'Upcycling memory')")
    lines.append(f"output: {recipe.run.output_dir}")
    return "\n".join(lines)


__all__ = ["MemoryEstimate", "ParameterCounts", "activation_bytes", "count_parameters", "dry_run_report",
           "expert_layout", "human_bytes", "meta_model", "resolve_model_config", "stage_memory", "state_bytes",
           "tokens_per_micro_batch", "world_size_of"]
