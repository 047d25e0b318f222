"""Parity of the decoder with transformers' Qwen2 on the same weights, and exact upcycling."""

import json

import pytest
import torch
from transformers import Qwen2ForCausalLM

from omni_moe.modeling.modeling_omni import OmniMoeForCausalLM
from omni_moe.modeling.upcycle import upcycle
from tests.tiny import tiny_config, tiny_qwen2_config

TOL = dict(rtol=0, atol=1e-5)


def dense_pair(seed=0):
    torch.manual_seed(seed)
    ref = Qwen2ForCausalLM(tiny_qwen2_config()).eval()
    ours = OmniMoeForCausalLM(tiny_config(media=False, moe_layers="none")).eval()
    missing, unexpected = ours.load_state_dict(ref.state_dict(), strict=False)
    assert not unexpected and not missing, (missing, unexpected)
    return ref, ours


def test_dense_decoder_equals_qwen2_logits_with_padding():
    ref, ours = dense_pair()
    ids = torch.randint(2, 90, (3, 11))
    mask = torch.ones_like(ids)
    mask[1, :4] = 0  # left padding
    mask[2, -3:] = 0  # right padding
    with torch.no_grad():
        for m in (None, mask):
            a = ref(input_ids=ids, attention_mask=m).logits
            b = ours(input_ids=ids, attention_mask=m).logits
            real = torch.ones_like(ids, dtype=torch.bool) if m is None else m.bool()
            torch.testing.assert_close(b[real], a[real], **TOL)


def test_dense_decoder_gradients_match_qwen2():
    ref, ours = dense_pair(1)
    ids = torch.randint(2, 90, (2, 9))
    ref(input_ids=ids, labels=ids).loss.backward()
    ours(input_ids=ids, labels=ids).loss.backward()
    ref_grads = dict(ref.named_parameters())
    for name, p in ours.named_parameters():
        if p.grad is not None:
            torch.testing.assert_close(p.grad, ref_grads[name].grad, **TOL)


def test_greedy_generate_with_kv_cache_matches_qwen2():
    ref, ours = dense_pair(2)
    ids = torch.randint(2, 90, (2, 6))
    mask = torch.ones_like(ids)
    mask[0, :2] = 0
    kw = dict(max_new_tokens=10, do_sample=False, pad_token_id=0, eos_token_id=None)
    out_ref = ref.generate(input_ids=ids, attention_mask=mask, **kw)
    out = ours.generate(input_ids=ids, attention_mask=mask, **kw)
    assert torch.equal(out, out_ref)
    # the cache path gives the same tokens as recomputing the whole sequence every step
    no_cache = ours.generate(input_ids=ids, attention_mask=mask, use_cache=False, **kw)
    assert torch.equal(no_cache, out)


@pytest.mark.parametrize("moe_layers", ["all", "every_other"])
def test_upcycled_copy_experts_reproduce_dense_logits(tmp_path, moe_layers):
    torch.manual_seed(3)
    dense = Qwen2ForCausalLM(tiny_qwen2_config()).eval()
    dense.save_pretrained(tmp_path / "dense")
    moe = upcycle(
        str(tmp_path / "dense"),
        moe_layers=moe_layers, num_intra_experts=2, num_inter_experts=2, num_null_experts=0,
        num_shared_experts=1, num_experts_per_tok=2, moe_intermediate_size=128, shared_expert_intermediate_size=64,
    ).eval()
    # make the router non-trivial: routing must not matter when every expert is a copy
    for block in moe.moe_blocks:
        torch.nn.init.normal_(block.gate.weight, std=1.0)
    ids = torch.randint(2, 90, (2, 12))
    modality_ids = torch.randint(0, 4, ids.shape)  # any pool: all experts are copies of the dense FFN
    embeds = moe.get_input_embeddings()(ids)
    with torch.no_grad():
        want = dense(input_ids=ids).logits
        got = moe(inputs_embeds=embeds, modality_ids=modality_ids).logits
    torch.testing.assert_close(got, want, **TOL)
    # and the upcycled model really is sparse MoE where asked
    assert len(moe.moe_blocks) == (2 if moe_layers == "all" else 1)


def test_upcycle_slice_init_takes_intermediate_slices(tmp_path):
    torch.manual_seed(4)
    dense = Qwen2ForCausalLM(tiny_qwen2_config())
    dense.save_pretrained(tmp_path / "dense")
    moe = upcycle(str(tmp_path / "dense"), expert_init="slice", moe_intermediate_size=32, num_null_experts=0)
    gate = dense.model.layers[0].mlp.gate_proj.weight
    experts = moe.model.layers[0].mlp.experts
    for e in range(experts.num_experts):
        j = e % 4
        torch.testing.assert_close(experts.gate_up_proj[e, :32], gate[j * 32 : (j + 1) * 32], rtol=0, atol=0)


def test_upcycle_rejects_bad_inputs(tmp_path):
    torch.manual_seed(5)
    Qwen2ForCausalLM(tiny_qwen2_config()).save_pretrained(tmp_path / "dense")
    with pytest.raises(ValueError, match="come from the dense checkpoint"):
        upcycle(str(tmp_path / "dense"), hidden_size=32)
    with pytest.raises(ValueError, match="copy init needs"):
        upcycle(str(tmp_path / "dense"), moe_intermediate_size=32)
    with pytest.raises(FileNotFoundError, match="no model.safetensors"):
        (tmp_path / "empty").mkdir()
        (tmp_path / "dense" / "config.json").replace(tmp_path / "empty" / "config.json")
        upcycle(str(tmp_path / "empty"))


def test_upcycle_builds_in_the_training_dtype_from_a_sharded_checkpoint(tmp_path):
    """The real-scale path: a sharded bf16 checkpoint, upcycled straight into bf16 (no fp32 model on the way:
    omni.benchmarks.upcycle_memory measures the memory) and filled in place; then the checkpoint's mistakes."""
    from safetensors.torch import load_file, save_file

    torch.manual_seed(6)
    dense = Qwen2ForCausalLM(tiny_qwen2_config()).to(torch.bfloat16)
    dense.save_pretrained(tmp_path / "dense", max_shard_size="50KB")
    assert len(list((tmp_path / "dense").glob("model-*.safetensors"))) > 1
    moe = upcycle(str(tmp_path / "dense"), expert_init="slice", moe_intermediate_size=32, num_null_experts=0,
                  dtype=torch.bfloat16)
    assert torch.get_default_dtype() == torch.float32  # the build's dtype did not leak
    assert {p.dtype for p in moe.parameters()} == {torch.bfloat16}
    assert all(b.gate.e_score_correction_bias.dtype == torch.float32 for b in moe.moe_blocks)  # kept in fp32
    want = dense.state_dict()
    got = moe.state_dict()
    for key in ("model.embed_tokens.weight", "model.layers.1.self_attn.q_proj.bias", "model.norm.weight"):
        assert torch.equal(got[key], want[key]), key
    gate = want["model.layers.1.mlp.gate_proj.weight"]
    assert torch.equal(got["model.layers.1.mlp.experts.gate_up_proj"][5, :32], gate[32:64])  # expert 5 = slice 1
    size = moe.config.shared_expert_intermediate_size
    assert torch.equal(got["model.layers.1.mlp.shared_expert.gate_proj.weight"], gate[:size])

    index = json.loads((tmp_path / "dense" / "model.safetensors.index.json").read_text())["weight_map"]
    shard = tmp_path / "dense" / index["model.norm.weight"]
    tensors = load_file(shard)
    save_file({**tensors, "model.layers.0.mlp.extra.weight": torch.zeros(2)}, shard, metadata={"format": "pt"})
    with pytest.raises(ValueError, match="'model.layers.0.mlp.extra.weight' has no place"):
        upcycle(str(tmp_path / "dense"), expert_init="slice", moe_intermediate_size=32, moe_layers=[1])
    save_file({**tensors, "model.norm.weight": torch.zeros(3)}, shard, metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"'model.norm.weight' has shape \(3,\), the MoE model expects \(64,\)"):
        upcycle(str(tmp_path / "dense"), expert_init="slice", moe_intermediate_size=32)
