"""`num_shared_experts`: n shared experts are one always-on SwiGLU MLP n times as wide (DeepSeek-MoE), exactly the
sum of n separately computed experts; upcycling gives expert i slice i of the dense FFN and still reproduces the
dense model's logits at init."""

from __future__ import annotations

import pytest
import torch
from transformers import Qwen2ForCausalLM

from omni_moe.modeling.configuration_omni import OmniMoeConfig
from omni_moe.modeling.experts import SwiGLUMLP
from omni_moe.modeling.moe import OmniSparseMoeBlock
from omni_moe.modeling.upcycle import upcycle
from tests.tiny import tiny_qwen2_config

D, FFN, SHARED_FFN = 16, 24, 20


def config(num_shared_experts: int) -> OmniMoeConfig:
    return OmniMoeConfig(
        vocab_size=64, hidden_size=D, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2, moe_intermediate_size=FFN, shared_expert_intermediate_size=SHARED_FFN,
        modalities=["text", "image"], num_intra_experts=1, num_inter_experts=2, num_null_experts=1,
        num_experts_per_tok=2, num_shared_experts=num_shared_experts,
    )


def shared_parameter_count(block: OmniSparseMoeBlock) -> int:
    return sum(p.numel() for name, p in block.named_parameters() if name.startswith("shared_expert"))


@pytest.mark.parametrize("n", [0, 1, 2, 3])
def test_the_shared_mlp_width_and_parameter_count_follow_num_shared_experts(n):
    cfg = config(n)
    block = OmniSparseMoeBlock(cfg)
    assert cfg.shared_mlp_intermediate_size == n * SHARED_FFN
    if n == 0:
        assert block.shared_expert is None and block.shared_expert_gate is None
        assert shared_parameter_count(block) == 0
        return
    assert block.shared_expert.intermediate_size == n * SHARED_FFN
    assert block.shared_expert.gate_proj.weight.shape == (n * SHARED_FFN, D)
    assert block.shared_expert.down_proj.weight.shape == (D, n * SHARED_FFN)
    # gate, up and down of n experts, plus the one sigmoid gate they share
    assert shared_parameter_count(block) == 3 * D * SHARED_FFN * n + D
    # the routed part does not depend on n
    routed = {k: v.shape for k, v in block.state_dict().items() if not k.startswith("shared_expert")}
    assert routed == {k: v.shape for k, v in OmniSparseMoeBlock(config(0)).state_dict().items()}


def test_negative_num_shared_experts_is_rejected_naming_the_key():
    with pytest.raises(ValueError, match="num_shared_experts must be >= 0"):
        config(-1)


def test_two_shared_experts_equal_the_sum_of_two_separate_experts_on_their_weight_slices():
    torch.manual_seed(0)
    block = OmniSparseMoeBlock(config(2)).double()
    with torch.no_grad():
        for param in block.parameters():
            param.normal_(0.0, 0.3)
    fused = block.shared_expert
    separate = []
    for i in range(2):
        rows = slice(i * SHARED_FFN, (i + 1) * SHARED_FFN)
        expert = SwiGLUMLP(D, SHARED_FFN).double()
        expert.load_state_dict({
            "gate_proj.weight": fused.gate_proj.weight[rows], "up_proj.weight": fused.up_proj.weight[rows],
            "down_proj.weight": fused.down_proj.weight[:, rows],
        })
        separate.append(expert)
    x = torch.randn(3, 7, D, dtype=torch.float64)
    modality_ids = torch.randint(0, 2, (3, 7))
    with torch.no_grad():
        expert_sum = separate[0](x) + separate[1](x)
        torch.testing.assert_close(fused(x), expert_sum, rtol=1e-12, atol=1e-12)
        assert (separate[0](x) - separate[1](x)).abs().max() > 0.1  # two different experts, not one counted twice

        # the whole layer: the same block without shared experts plus the gated sum of the two experts
        routed_only = OmniSparseMoeBlock(config(0)).double()
        routed_state = {k: v for k, v in block.state_dict().items() if not k.startswith("shared_expert")}
        routed_only.load_state_dict(routed_state, strict=True)
        out, _ = block(x, modality_ids)
        routed, _ = routed_only(x, modality_ids)
        want = routed + torch.sigmoid(block.shared_expert_gate(x)) * expert_sum
        torch.testing.assert_close(out, want, rtol=1e-12, atol=1e-12)


def test_upcycled_model_with_two_shared_experts_reproduces_the_dense_logits(tmp_path):
    torch.manual_seed(3)
    dense = Qwen2ForCausalLM(tiny_qwen2_config()).eval()
    dense.save_pretrained(tmp_path / "dense")
    size = 48  # 2 x 48 <= the dense intermediate size (128): two distinct slices
    moe = upcycle(str(tmp_path / "dense"), num_intra_experts=2, num_inter_experts=2, num_null_experts=0,
                  num_shared_experts=2, num_experts_per_tok=2, moe_intermediate_size=128,
                  shared_expert_intermediate_size=size).eval()
    for i, layer in enumerate(moe.model.layers):
        dense_mlp, shared = dense.model.layers[i].mlp, layer.mlp.shared_expert
        assert shared.intermediate_size == 2 * size
        for e in range(2):  # shared expert e = slice e of the dense FFN
            rows = slice(e * size, (e + 1) * size)
            assert torch.equal(shared.gate_proj.weight[rows], dense_mlp.gate_proj.weight[rows])
            assert torch.equal(shared.up_proj.weight[rows], dense_mlp.up_proj.weight[rows])
        assert not shared.down_proj.weight.any()
    for block in moe.moe_blocks:  # routing must not matter when every routed expert is a copy
        torch.nn.init.normal_(block.gate.weight, std=1.0)
    ids = torch.randint(2, 90, (2, 12))
    with torch.no_grad():
        want = dense(input_ids=ids).logits
        got = moe(inputs_embeds=moe.get_input_embeddings()(ids), modality_ids=torch.randint(0, 4, ids.shape)).logits
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)


def test_upcycling_refuses_shared_experts_wider_than_the_dense_ffn(tmp_path):
    torch.manual_seed(4)
    Qwen2ForCausalLM(tiny_qwen2_config()).save_pretrained(tmp_path / "dense")
    with pytest.raises(ValueError, match=r"num_shared_experts x shared_expert_intermediate_size = 3 x 64 = 192 > "
                                         r"the dense intermediate_size 128"):
        upcycle(str(tmp_path / "dense"), num_null_experts=0, num_shared_experts=3,
                shared_expert_intermediate_size=64)
