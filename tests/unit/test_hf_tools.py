"""Real tools on the model: HF Trainer with gradient accumulation, torch.compile, torch.export, PEFT LoRA.

    .venv/bin/python -m pytest -q tests/unit/test_hf_tools.py

Each tool runs for real on a tiny model saved and reloaded the way an exported folder is (`save_pretrained`, then
`AutoModelForCausalLM.from_pretrained(..., trust_remote_code=True)` from the copied remote code).
"""

from __future__ import annotations

import copy

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModel, AutoModelForCausalLM, Trainer, TrainingArguments

from omni_moe.modeling.modeling_omni import OmniMoeForCausalLM, OmniMoeModel
from tests.hf_upstream import one_torch_thread  # noqa: F401 (autouse fixture)
from tests.tiny import tiny_config

# null experts and dynamic top-p: the MoE paths whose eager dispatch has data-dependent shapes
TEXT_MOE = dict(media=False, image_token_id=None, video_token_id=None, audio_token_id=None, moe_top_p=0.7)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A tiny text model saved as an HF folder, loaded back through the Auto classes with its remote code."""
    path = tmp_path_factory.mktemp("exported")
    torch.manual_seed(0)
    OmniMoeForCausalLM(tiny_config(**TEXT_MOE)).save_pretrained(path)
    return path


def load(path, **kw):
    return AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True, **kw)


def test_trainer_gradient_accumulation_matches_the_joined_batch(exported, tmp_path):
    """Two micro-batches with gradient_accumulation_steps=2 == one step on the joined batch (plain SGD, no clipping,
    so a gradient k times too large would show as a k times larger update)."""
    torch.manual_seed(1)
    ids = torch.randint(3, 90, (4, 8))
    labels = ids.clone()
    labels[0, :6] = -100  # micro-batches with different label counts: a per-micro-batch mean would weigh them wrong
    labels[1, :5] = -100
    rows = [{"input_ids": i, "labels": l} for i, l in zip(ids, labels)]

    def one_step(batch_size, accumulation, out):
        model = load(exported, router_aux_loss_coef=0.0, router_z_loss_coef=0.0)  # CE only: it decomposes exactly
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        args = TrainingArguments(
            output_dir=str(tmp_path / out), per_device_train_batch_size=batch_size,
            gradient_accumulation_steps=accumulation, max_steps=1, learning_rate=1.0, optim="sgd",
            max_grad_norm=0.0, lr_scheduler_type="constant", use_cpu=True, report_to=[], save_strategy="no",
            logging_strategy="no", dataloader_drop_last=True, seed=0,
        )
        Trainer(model=model, args=args, train_dataset=rows).train()
        return {n: p.detach() - before[n] for n, p in model.named_parameters()}

    joined = one_step(4, 1, "joined")
    accumulated = one_step(2, 2, "accumulated")
    assert any(d.abs().max() > 0 for d in joined.values())
    for name, delta in joined.items():
        torch.testing.assert_close(accumulated[name], delta, rtol=1e-4, atol=1e-6, msg=name)


def test_loss_kwargs_follow_transformers(exported):
    model = load(exported).eval()
    torch.manual_seed(2)
    ids = torch.randint(3, 90, (2, 7))
    labels = ids.clone()
    labels[0, :3] = -100
    shifted = torch.nn.functional.pad(labels, (0, 1), value=-100)[:, 1:]
    base = model(ids, labels=labels)
    torch.testing.assert_close(model(ids, shift_labels=shifted).ce_loss, base.ce_loss)
    n = int((shifted != -100).sum())
    torch.testing.assert_close(model(ids, labels=labels, num_items_in_batch=4 * n).ce_loss, base.ce_loss / 4)


def test_torch_compile_fullgraph_matches_eager(exported):
    """fullgraph=True: no graph break anywhere, the MoE dispatch included (its traced path has static shapes)."""
    model = load(exported).eval()
    torch.manual_seed(3)
    ids = torch.randint(3, 90, (2, 9))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    with torch.no_grad():
        eager = model(ids, attention_mask=mask, use_cache=False)
        torch._dynamo.reset()
        compiled = torch.compile(model, fullgraph=True, backend="aot_eager")(ids, attention_mask=mask, use_cache=False)
    torch.testing.assert_close(compiled.logits, eager.logits, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(compiled.aux_loss, eager.aux_loss)


def test_torch_export_for_a_fixed_shape(exported):
    model = load(exported).eval()
    torch.manual_seed(4)
    ids = torch.randint(3, 90, (2, 9))
    program = torch.export.export(model, args=(), kwargs={"input_ids": ids, "use_cache": False})
    other = torch.randint(3, 90, (2, 9))  # same shape, other values: nothing was specialised on the data
    with torch.no_grad():
        for x in (ids, other):
            torch.testing.assert_close(program.module()(input_ids=x, use_cache=False).logits,
                                       model(x, use_cache=False).logits, rtol=1e-4, atol=1e-5)


def test_peft_lora_trains_and_merges(exported):
    model = load(exported)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "o_proj"],
                        target_parameters=["experts.gate_up_proj", "experts.down_proj"])
    peft_model = get_peft_model(model, config)
    trainable = [p for p in peft_model.parameters() if p.requires_grad]
    assert trainable and all(p.requires_grad for n, p in peft_model.named_parameters() if "lora_" in n)
    torch.manual_seed(5)
    ids = torch.randint(3, 90, (2, 8))
    optimizer = torch.optim.AdamW(trainable, lr=1e-2)
    losses = []
    for _ in range(8):
        loss = peft_model(ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    peft_model.eval()
    with torch.no_grad():
        adapted = peft_model(ids, use_cache=False).logits
        merged = peft_model.merge_and_unload()
        assert not any("lora_" in n for n, _ in merged.named_parameters())
        torch.testing.assert_close(merged(ids, use_cache=False).logits, adapted, rtol=1e-4, atol=1e-5)


def test_base_model_is_a_pretrained_model(exported, tmp_path):
    """base_model.save_pretrained, AutoModel, and base <-> head checkpoint interchange."""
    head = load(exported).eval()
    base = AutoModel.from_pretrained(exported, trust_remote_code=True).eval()  # the decoder out of the head's folder
    assert type(base).__name__ == "OmniMoeModel"
    torch.manual_seed(6)
    ids = torch.randint(3, 90, (2, 7))
    with torch.no_grad():
        expected = head(ids, output_hidden_states=True, use_cache=False).hidden_states[-1]
        torch.testing.assert_close(base(ids, use_cache=False).last_hidden_state, expected)
    head.base_model.save_pretrained(tmp_path / "base")
    reloaded = OmniMoeForCausalLM.from_pretrained(tmp_path / "base").eval()  # the head from the base's folder
    for name, value in head.model.state_dict().items():
        torch.testing.assert_close(reloaded.model.state_dict()[name], value, msg=name)
    assert isinstance(OmniMoeModel.from_pretrained(tmp_path / "base"), OmniMoeModel)


def test_packed_documents_do_not_see_each_other(exported):
    """Position ids that restart mark packed documents (DataCollatorWithFlattening, TRL padding-free): with no
    attention mask, each document's logits equal those of the document alone -- 1-D ids, and the [4, B, T] layout
    (a text row, then t/h/w) of transformers' Qwen2-VL."""
    model = load(exported).eval()
    torch.manual_seed(7)
    first, second = torch.randint(3, 90, (1, 5)), torch.randint(3, 90, (1, 6))
    packed = torch.cat([first, second], dim=1)
    positions = torch.cat([torch.arange(5), torch.arange(6)])[None]
    with torch.no_grad():
        alone = model(second, use_cache=False).logits
        flat = model(packed, position_ids=positions, use_cache=False).logits
        four_rows = model(packed, position_ids=positions[None].expand(4, 1, -1), use_cache=False).logits
    torch.testing.assert_close(flat[:, 5:], alone, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(four_rows[:, 5:], alone, rtol=1e-4, atol=1e-5)


def test_eager_attention_is_used_when_asked(exported):
    model = load(exported, attn_implementation="eager").eval()
    assert model.config._attn_implementation == "eager"
    ids = torch.randint(3, 90, (1, 6))
    with torch.no_grad():
        out = model(ids, output_attentions=True, use_cache=False)
        sdpa = copy.deepcopy(model)
        sdpa.set_attn_implementation("sdpa")
        torch.testing.assert_close(sdpa(ids, use_cache=False).logits, out.logits, rtol=1e-4, atol=1e-5)
    assert len(out.attentions) == model.config.num_hidden_layers
    assert out.attentions[0].shape == (1, model.config.num_attention_heads, 6, 6)


@pytest.mark.parametrize("use_reentrant", [True, False])
def test_gradient_checkpointing_honours_use_reentrant(exported, use_reentrant):
    """Each decoder layer is transformers' GradientCheckpointingLayer, checkpointed as asked; the router's aux and
    z losses keep their gradients through the recomputation (the layer returns them as plain tensors)."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    torch.manual_seed(8)
    ids = torch.randint(3, 90, (2, 7))
    grads = []
    for checkpointing in (False, True):
        model = load(exported, router_aux_loss_coef=0.5, router_z_loss_coef=0.1).train()
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": use_reentrant})
            layer = model.model.layers[0]
            assert isinstance(layer, GradientCheckpointingLayer) and layer.gradient_checkpointing
            assert layer._gradient_checkpointing_func.keywords["use_reentrant"] is use_reentrant
        model(ids, labels=ids).loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[1].keys() == grads[0].keys() and any("gate.weight" in n for n in grads[0])
    for name, grad in grads[0].items():
        torch.testing.assert_close(grads[1][name], grad, rtol=1e-4, atol=1e-6, msg=name)
