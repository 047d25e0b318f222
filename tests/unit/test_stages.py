"""Stages as data: StageSpec validation, exact freezing (row-masked fused experts), optimizer groups, MoE overrides."""

import pytest
import torch
from torch import nn

from omni_moe.modeling.media import audio_chunk_count, audio_token_count, image_token_count
from omni_moe.modeling.modeling_omni import OmniMoeForCausalLM
from tests.tiny import AUDIO_ID, IMAGE_ID, right_padded, tiny_config
from omni_moe.training.freeze import apply_moe_overrides, apply_stage, trainable_param_groups
from omni_moe.training.stage_spec import StageConfigError, StageSpec, parse_stages


def media_batch(config, audio=True, seed=0):
    """Two or three samples: text only, text + one image, (text + one 0.6 s audio clip); right padded."""
    g = torch.Generator().manual_seed(seed)
    text = lambda n: torch.randint(2, 90, (n,), generator=g).tolist()  # noqa: E731
    rows = [text(10), text(3) + [IMAGE_ID] * image_token_count(config) + text(4)]
    samples = 9600
    if audio:
        rows.append(text(2) + [AUDIO_ID] * audio_token_count(config, samples) + text(3))
    ids, mask = right_padded(rows)
    size = config.vision_config.image_size
    batch = dict(
        input_ids=ids,
        attention_mask=mask,
        labels=ids.masked_fill(mask == 0, -100),
        pixel_values=torch.randn(1, 3, size, size, generator=g),
    )
    if audio:
        n_chunks = audio_chunk_count(config, samples)
        batch.update(
            audio_features=torch.randn(n_chunks, config.audio_config.num_mel_bins,
                                       2 * config.audio_config.max_source_positions, generator=g),
            audio_chunk_counts=torch.tensor([n_chunks]),
            audio_token_counts=torch.tensor([audio_token_count(config, samples)]),
        )
    return batch


def fresh_model(media=True):
    torch.manual_seed(0)
    return OmniMoeForCausalLM(tiny_config(media=media))


def train_steps(model, plan, batch, steps=3, lr=1e-2, weight_decay=0.01):
    optimizer = torch.optim.AdamW(trainable_param_groups(model, plan, lr, weight_decay))
    for _ in range(steps):
        optimizer.zero_grad()
        model(**batch).loss.backward()
        optimizer.step()
    return optimizer


def snapshot(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def stage(**kw):
    return StageSpec.from_dict({"name": "s", "steps": 3, **kw})


# ----------------------------------------------------------------------------- spec validation
@pytest.mark.parametrize(
    "raw, key",
    [
        ({"name": "s", "steps": 1, "train": ["routers"], "optimiser": {}}, "optimiser"),
        ({"name": "s", "steps": 1, "train": ["routers"], "optimizer": {"lr": -1}}, "optimizer.lr"),
        ({"name": "s", "steps": 1, "train": ["routers"], "optimizer": {"learning_rate": 1e-3}}, "optimizer.learning_rate"),
        ({"name": "s", "steps": 1, "train": ["attn"]}, "attn"),
        ({"name": "s", "steps": 1, "epochs": 2, "train": ["routers"]}, "unknown key epochs"),
        ({"name": "s", "train": ["routers"]}, "steps must be a positive integer .*required.*got None"),
        ({"name": "s", "steps": 0, "train": ["routers"]}, "steps must be a positive integer .*got 0"),
        ({"name": "s", "steps": 2, "train": ["routers"], "optimizer": {"warmup_steps": -1}}, "optimizer.warmup_steps"),
        ({"name": "s", "steps": 2, "train": ["routers"], "optimizer": {"schedule": "step"}}, "optimizer.schedule"),
        ({"name": "s", "steps": 2, "train": ["routers"], "optimizer": {"grad_clip": 0}}, "optimizer.grad_clip"),
        ({"name": "s", "steps": 1, "train": ["routers"], "moe": {"top_k": 1}}, "moe.top_k"),
        ({"name": "s", "steps": 1, "train": ["routers"], "moe": {"moe_top_p": 1.5}}, "moe.moe_top_p"),
        ({"name": "s", "steps": 1, "train": ["lora"], "lora": {"r": 0}}, "lora.r"),
        ({"name": "s", "steps": 1, "train": ["lora"], "lora": {"targets": ["mlp"]}}, "lora.targets"),
        ({"name": "s", "steps": 1, "train": ["routers"], "data": [{"weight": 1}]}, r"data\[0\]"),
        ({"name": "s", "steps": 1, "preset": "warmup"}, "preset"),
        ({"name": "s", "steps": 1, "preset": {"name": "alignment", "freeze": True}}, "freeze"),
        ({"steps": 1, "train": ["routers"]}, "name"),
    ],
)
def test_spec_errors_name_the_bad_key(raw, key):
    with pytest.raises(StageConfigError, match=key) as info:
        StageSpec.from_dict(raw)
    assert "stage" in str(info.value)


def test_spec_from_dict_with_presets():
    stages = parse_stages([
        {"name": "align", "preset": {"name": "alignment", "encoders_pretrained": False}, "steps": 10,
         "data": [{"source": "caps", "weight": 2.0}], "optimizer": {"lr": 1e-3, "betas": [0.9, 0.95]}},
        {"name": "lora", "preset": "mixed_lora", "lora": {"r": 4}, "steps": 1, "moe": {"use_inter_pool": False},
         "optimizer": {"grad_clip": None, "schedule": "linear"}},
    ])
    align, lora = stages
    assert set(align.train) == {"image_projector", "audio_projector", "vision_encoder", "audio_encoder"}
    assert align.optimizer.lr == 1e-3 and align.optimizer.betas == (0.9, 0.95) and align.data[0]["weight"] == 2.0
    assert lora.lora.r == 4 and "experts" in lora.lora.targets and "lora" in lora.train and lora.steps == 1
    assert lora.optimizer.grad_clip is None and lora.optimizer.schedule == "linear"  # null: clipping off
    with pytest.raises(StageConfigError, match="duplicate"):
        parse_stages([{"name": "a", "steps": 1, "train": ["routers"]}] * 2)


def test_apply_time_errors_name_the_problem():
    with pytest.raises(StageConfigError, match="'smell'"):
        apply_stage(fresh_model(), stage(train=["intra_experts:smell"]))
    with pytest.raises(StageConfigError, match="no LoRA adapter"):
        apply_stage(fresh_model(), stage(train=["lora"]))
    with pytest.raises(StageConfigError, match="selects no parameter"):  # alignment on a model without encoders
        apply_stage(fresh_model(media=False), stage(preset="alignment"))


# ----------------------------------------------------------------------------- exact freezing
def test_alignment_changes_projectors_only():
    model = fresh_model()
    plan = apply_stage(model, stage(preset="alignment"))
    before = snapshot(model)
    optimizer = train_steps(model, plan, media_batch(model.config))
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    projector_params = {n for n in before if n.startswith(("media.image_projector.", "media.audio_projector."))}
    assert changed == projector_params  # every projector tensor moved; nothing else (LLM, encoders) by a bit
    # frozen params get no optimizer state; trainable ones do
    in_state = {id(p) for p in optimizer.state}
    assert all((id(p) in in_state) == p.requires_grad for p in model.parameters())
    assert plan.trainable.keys() == {"image_projector", "audio_projector"}


def test_modality_experts_trains_only_image_rows_of_fused_experts():
    model = fresh_model()
    pools = model.config.expert_pools()
    plan = apply_stage(model, stage(preset={"name": "modality_experts", "modalities": ["image"]}))
    assert plan.trainable_experts == tuple(pools["image"])
    groups = {g["name"]: g for g in trainable_param_groups(model, plan, 1e-3, 0.01)}
    assert groups["expert_rows_masked"]["weight_decay"] == 0.0  # AdamW's decay would move frozen rows
    before = snapshot(model)
    batch = media_batch(model.config, audio=False)
    train_steps(model, plan, batch)
    for name, param in model.named_parameters():
        if name.endswith(("experts.gate_up_proj", "experts.down_proj")):
            for modality, ids in pools.items():
                for g in ids if modality != "null" else ():  # null experts own no weights
                    same = torch.equal(param[g], before[name][g])
                    assert same != (modality == "image"), f"{name} expert {g} ({modality}) changed={not same}"
        elif name.endswith("mlp.gate.weight"):
            assert not torch.equal(param, before[name]), f"router {name} did not train"
        else:
            assert torch.equal(param, before[name]), f"{name} is frozen but changed"


def test_row_masks_follow_the_expert_parallel_id_map():
    """A rank holding global experts 1, 3, 5, 7, 9 (round-robin, EP=2): only its local row of global 3 trains."""
    model = fresh_model()
    for block in model.moe_blocks:
        experts = block.experts
        for attr in ("gate_up_proj", "down_proj"):
            setattr(experts, attr, nn.Parameter(getattr(experts, attr).detach()[1::2].clone()))
        experts.num_experts, experts.global_ids, experts.expert_offset = 5, (1, 3, 5, 7, 9), 1
    plan = apply_stage(model, stage(train=["intra_experts:image"]))  # image pool = global [2, 3]
    assert all(m.trainable_rows == (1,) and m.global_ids == (1, 3, 5, 7, 9) for m in plan.masked)
    assert len(plan.masked) == 2 * len(model.moe_blocks)
    param = plan.masked[0].param
    (param * torch.randn_like(param)).sum().backward()
    nonzero_rows = (param.grad.flatten(1).abs().sum(1) > 0).nonzero().flatten().tolist()
    assert nonzero_rows == [1]


def test_remove_and_reapply_replace_the_hooks():
    model = fresh_model()
    first = apply_stage(model, stage(train=["intra_experts:image"]))
    param = first.masked[0].param
    apply_stage(model, stage(train=["intra_experts:text"]))  # replaces the image-only hook
    (param * torch.ones_like(param)).sum().backward()
    rows_with_grad = (param.grad.flatten(1).abs().sum(1) > 0).nonzero().flatten().tolist()
    assert rows_with_grad == list(model.config.expert_pools()["text"])
    model._omni_freeze_plan.remove()
    param.grad = None
    (param * torch.ones_like(param)).sum().backward()
    assert bool((param.grad.flatten(1).abs().sum(1) > 0).all())


def test_param_groups_keep_norms_biases_routers_out_of_weight_decay():
    model = fresh_model()
    plan = apply_stage(model, stage(train=["attention", "norms", "routers", "embeddings"]))
    groups = {g["name"]: g for g in trainable_param_groups(model, plan, 1e-3, 0.1)}
    names = {id(p): n for n, p in model.named_parameters()}
    no_decay = {names[id(p)] for p in groups["no_decay"]["params"]}
    decay = {names[id(p)] for p in groups["decay"]["params"]}
    assert any("q_proj.bias" in n for n in no_decay) and any("layernorm" in n for n in no_decay)
    assert any(n.endswith("mlp.gate.weight") for n in no_decay)
    assert all(not n.endswith(("bias", "norm.weight", "gate.weight")) for n in decay)
    assert groups["decay"]["weight_decay"] == 0.1 and groups["no_decay"]["weight_decay"] == 0.0


def test_router_lr_scale_gives_the_routers_their_own_group():
    model = OmniMoeForCausalLM(tiny_config(media=True, router_modality_bias=True))
    plan = apply_stage(model, stage(train=["attention", "routers"]))
    assert plan.trainable["routers"] == sum(b.gate.weight.numel() + b.gate.modality_bias.numel()
                                            for b in model.moe_blocks)
    names = {id(p): n for n, p in model.named_parameters()}
    groups = {g["name"]: g for g in trainable_param_groups(model, plan, 1e-3, 0.1, router_lr_scale=10.0)}
    routers = {names[id(p)] for p in groups["routers"]["params"]}
    assert routers == {n for n in names.values() if n.endswith(("mlp.gate.weight", "mlp.gate.modality_bias"))}
    assert groups["routers"]["lr"] == pytest.approx(1e-2) and groups["routers"]["weight_decay"] == 0.0
    assert not routers & {names[id(p)] for g in groups.values() if g["name"] != "routers" for p in g["params"]}
    assert "routers" not in {g["name"] for g in trainable_param_groups(model, plan, 1e-3, 0.1)}  # scale 1: no group
    # Adam moves every weight by ~lr a step: the routers move ~10x as far as at the default scale
    batch = media_batch(model.config, audio=False)
    moved = {}
    for scale in (1.0, 10.0):
        torch.manual_seed(0)
        trial = OmniMoeForCausalLM(tiny_config(media=True, router_modality_bias=True))
        trial_plan = apply_stage(trial, stage(train=["attention", "routers"]))
        before = trial.moe_blocks[0].gate.weight.detach().clone()
        optimizer = torch.optim.AdamW(trainable_param_groups(trial, trial_plan, 1e-3, 0.1, router_lr_scale=scale))
        optimizer.zero_grad()
        trial(**batch).loss.backward()
        optimizer.step()
        moved[scale] = (trial.moe_blocks[0].gate.weight - before).abs().max().item()
    assert moved[10.0] == pytest.approx(10 * moved[1.0], rel=1e-3)
    with pytest.raises(StageConfigError, match="router_lr_scale"):
        stage(train=["routers"], optimizer={"router_lr_scale": 0})


# ----------------------------------------------------------------------------- MoE overrides
def inter_slots(model, batch):
    with torch.no_grad():
        out = model(**batch)
    inter = model.config.expert_pools()["inter"]
    return sum(float(r.tokens_per_expert[:, inter.start:inter.stop].sum()) for r in out.router_outputs)


def test_moe_overrides_reach_the_live_model():
    model = fresh_model()
    batch = media_batch(model.config, audio=False)
    assert inter_slots(model, batch) > 0  # the default routes some tokens to the inter pool
    plan = apply_stage(model, stage(train=["routers"], moe={"use_inter_pool": False, "num_experts_per_tok": 1,
                                                              "router_aux_loss_coef": 0.5, "router_balance": "pool"}))
    assert plan.moe_changes["use_inter_pool"] == (True, False)
    assert plan.moe_changes["router_balance"] == ("modality", "pool")
    assert all(b.router_balance == "pool" for b in model.moe_blocks)
    assert inter_slots(model, batch) == 0
    assert all(b.top_k == 1 and not b.gate.allowed[:, model.config.expert_pools()["inter"].start].any()
               for b in model.moe_blocks)
    out = model(**batch)
    torch.testing.assert_close(out.loss, out.ce_loss + 0.5 * out.aux_loss + model.config.router_z_loss_coef * out.z_loss)
    # an impossible combination (top-4 from intra 2 + null 1) is refused and leaves the model as it was
    with pytest.raises(StageConfigError, match="top_k"):
        apply_moe_overrides(model, {"num_experts_per_tok": 4})
    assert model.config.num_experts_per_tok == 1 and model.moe_blocks[0].top_k == 1
