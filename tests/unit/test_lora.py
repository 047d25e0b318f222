"""LoRA through PEFT: attention + fused routed experts (per-expert adapters) + shared experts; merge, save/load."""

import pytest
import torch
from peft import PeftModel

from omni_moe.modeling.modeling_omni import OmniMoeForCausalLM
from omni_moe.modeling.moe import GroupedExperts
from tests.tiny import tiny_config
from tests.unit.test_stages import media_batch
from omni_moe.training.lora import (
    TRAINED_BASE_FILE,
    attach_lora,
    expert_lora_parameters,
    is_lora_param_name,
    load_adapter,
    merge_lora,
    save_adapter,
    unwrap_model,
)
from omni_moe.training.freeze import apply_stage, prepare_model_for_stage, trainable_param_groups
from omni_moe.training.stage_spec import StageSpec

# peft itself calls a transformers API that transformers 5 deprecates; not ours to fix
pytestmark = pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing.*:FutureWarning")
MIXED_LORA = StageSpec.from_dict({"name": "mixed", "preset": "mixed_lora", "lora": {"r": 2, "alpha": 4}, "steps": 3})


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    """A tiny base model saved once; every test loads identical base weights from here."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("base")
    OmniMoeForCausalLM(tiny_config()).save_pretrained(path)
    return path


def load_base(base_dir):
    return OmniMoeForCausalLM.from_pretrained(base_dir).eval()


@pytest.fixture(scope="module")
def trained(base_dir):
    """The mixed_lora stage after 3 AdamW steps: (peft model, plan, batch)."""
    model = prepare_model_for_stage(load_base(base_dir), MIXED_LORA)
    plan = apply_stage(model, MIXED_LORA)
    batch = media_batch(model.config, audio=False)
    optimizer = torch.optim.AdamW(trainable_param_groups(model, plan, lr=1e-2, weight_decay=0.01))
    for _ in range(3):
        optimizer.zero_grad()
        model(**batch).loss.backward()
        optimizer.step()
    model.eval()
    return model, plan, batch


def test_attach_keeps_the_model_interface_and_trains_only_lora(base_dir):
    model = attach_lora(load_base(base_dir), r=2, alpha=4, dropout=0.0)
    assert isinstance(model, PeftModel) and model.config.model_type == "omni_moe"
    assert len(model.moe_blocks) == model.config.num_hidden_layers and isinstance(unwrap_model(model), OmniMoeForCausalLM)
    batch = media_batch(model.config, audio=False)
    model(**batch).loss.backward()
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
    lora_names = {n for n, _ in model.named_parameters() if is_lora_param_name(n)}
    assert with_grad == lora_names
    targeted = {n.split(".lora_")[0] for n in lora_names}
    assert any(n.endswith("self_attn.q_proj") for n in targeted) and any(n.endswith("shared_expert.down_proj") for n in targeted)
    assert not any("vision_encoder" in n or "audio_encoder" in n for n in targeted)  # encoders' own q_proj untouched
    # with lora_B = 0 at init, lora_A gets zero gradients but lora_B does not
    assert all(p.grad.abs().sum() > 0 for n, p in model.named_parameters() if "lora_B" in n)


def test_stage_adds_routers_and_projectors_to_the_trainable_set(trained):
    model, plan, _ = trained
    assert plan.trainable.keys() == {"lora", "routers", "image_projector", "audio_projector"}
    for name, param in model.named_parameters():
        expected = is_lora_param_name(name) or name.endswith("mlp.gate.weight") or "_projector." in name
        assert param.requires_grad == expected, name


def test_expert_lora_parameters_are_per_expert_and_listed(trained):
    model, _, _ = trained
    listed = dict(expert_lora_parameters(model))
    expected = {n for n in dict(model.named_parameters()) if is_lora_param_name(n) and ".mlp.experts." in n}
    assert set(listed) == expected and len(listed) == 4 * len(model.moe_blocks)  # 2 tensors x (A, B) per layer
    E, r = model.config.num_routed_experts, 2
    for name, param in listed.items():
        assert (param.shape[0] if "lora_A" in name else param.shape[1]) == r * E, (name, param.shape)


def expert_outputs(experts, x, tokens_per_expert):
    with torch.no_grad():
        return experts(x, tokens_per_expert)


def test_expert_adapter_changes_only_its_own_experts_output(base_dir):
    model = attach_lora(load_base(base_dir), r=2, alpha=4, dropout=0.0, targets=("experts",))
    wrapper = model.moe_blocks[0].experts
    base_experts = wrapper.get_base_layer()
    while not isinstance(base_experts, GroupedExperts):
        base_experts = base_experts.get_base_layer()
    E, D = base_experts.num_experts, base_experts.hidden_size
    tokens_per_expert = torch.full((E,), 3)
    x = torch.randn(3 * E, D, generator=torch.Generator().manual_seed(1))
    before = expert_outputs(base_experts, x, tokens_per_expert)
    assert torch.equal(expert_outputs(wrapper, x, tokens_per_expert), before)  # B = 0: a no-op at init
    target = 4
    with torch.no_grad():  # a non-zero delta for expert `target` only: B columns j * E + target
        for name, param in expert_lora_parameters(model):
            if "lora_B" in name and "layers.0." in name:
                param[:, target::E] = torch.randn(param.shape[0], 2) * 0.5
    after = expert_outputs(wrapper, x, tokens_per_expert)
    changed_rows = (after - before).abs().sum(1) > 0
    assert changed_rows.view(E, 3).all(1).tolist() == [e == target for e in range(E)]


def test_merge_matches_the_unmerged_adapter(base_dir, trained, tmp_path):
    model, _, batch = trained
    with torch.no_grad():
        unmerged = model(**batch).logits
    merged = merge_lora(load_adapter(load_base(base_dir), save_adapter(model, tmp_path)))  # merging is in place
    assert type(merged) is OmniMoeForCausalLM and not any(is_lora_param_name(n) for n, _ in merged.named_parameters())
    with torch.no_grad():
        merged_logits = merged(**batch).logits
    assert not torch.equal(merged_logits, load_base(base_dir)(**batch).logits)  # training did something
    torch.testing.assert_close(merged_logits, unmerged, rtol=0, atol=1e-5)


def test_saved_adapter_on_a_fresh_base_gives_identical_logits(base_dir, trained, tmp_path):
    model, _, batch = trained
    save_adapter(model, tmp_path)
    assert (tmp_path / "adapter_config.json").is_file() and (tmp_path / TRAINED_BASE_FILE).is_file()
    reloaded = load_adapter(load_base(base_dir), tmp_path).eval()
    with torch.no_grad():
        assert torch.equal(reloaded(**batch).logits, model(**batch).logits)


def test_bad_lora_settings_are_refused(base_dir):
    model = load_base(base_dir)
    with pytest.raises(ValueError, match="dropout"):
        attach_lora(model, r=2, alpha=4, dropout=0.1)  # PEFT's parameter LoRA cannot apply dropout
    with pytest.raises(ValueError, match="mlp_experts"):
        attach_lora(model, r=2, alpha=4, targets=("mlp_experts",))
    attention_only = attach_lora(model, r=2, alpha=4, dropout=0.1, targets=("attention",))
    assert expert_lora_parameters(attention_only) == []


def test_row_masks_still_apply_through_the_expert_adapter(base_dir):
    """LoRA parametrizes the fused tensor during forward; the gradient still reaches the same Parameter and its hook."""
    model = attach_lora(load_base(base_dir), r=2, alpha=4)
    plan = apply_stage(model, StageSpec.from_dict({"name": "s", "steps": 1, "train": ["lora", "intra_experts:image"]}))
    model(**media_batch(model.config, audio=False)).loss.backward()
    image = list(model.config.expert_pools()["image"])
    for masked in plan.masked:
        # only image experts' rows get a gradient (which of them depends on where the random router sends tokens)
        rows = (masked.param.grad.flatten(1).abs().sum(1) > 0).nonzero().flatten().tolist()
        assert rows and set(rows) <= set(image), (masked.name, rows)
    assert all(p.grad is not None for n, p in expert_lora_parameters(model))
