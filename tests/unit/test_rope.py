"""Omni 3D RoPE reduces exactly to 1-D RoPE when the three position rows are equal; each layout drives the pairs it
says; the interleaved layout gives every axis a fast frequency."""

import pytest
import torch
from transformers.models.qwen2.modeling_qwen2 import Qwen2RotaryEmbedding, apply_rotary_pos_emb

from omni_moe.modeling.configuration_omni import default_mrope_section
from omni_moe.modeling.modeling_omni import OmniMoeForCausalLM
from omni_moe.modeling.rope import OmniRotaryEmbedding, apply_omni_rotary, frequency_components
from tests.tiny import tiny_config, tiny_qwen2_config


@pytest.mark.parametrize("interleaved", [True, False])
def test_equal_components_equal_qwen2_rope(interleaved):
    cfg = tiny_qwen2_config()
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    ours = OmniRotaryEmbedding(head_dim, 10000.0, default_mrope_section(head_dim), interleaved)
    ref = Qwen2RotaryEmbedding(cfg)
    x = torch.zeros(1, dtype=torch.float32)
    pos = torch.randint(0, 300, (2, 17))
    cos_ref, sin_ref = ref(x, pos)
    cos, sin = ours(x, pos.unsqueeze(0).expand(3, -1, -1))
    torch.testing.assert_close(cos, cos_ref, rtol=0, atol=0)
    torch.testing.assert_close(sin, sin_ref, rtol=0, atol=0)
    q, k = torch.randn(2, 4, 17, head_dim), torch.randn(2, 2, 17, head_dim)
    for a, b in zip(apply_omni_rotary(q, k, cos, sin), apply_rotary_pos_emb(q, k, cos_ref, sin_ref)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("interleaved", [True, False])
def test_components_drive_their_own_pairs(interleaved):
    head_dim = 16
    section = default_mrope_section(head_dim)
    rope = OmniRotaryEmbedding(head_dim, 10000.0, section, interleaved)
    components = torch.tensor(frequency_components(section, interleaved))
    x = torch.zeros(1)
    base = torch.zeros(3, 1, 1, dtype=torch.long)
    cos0, _ = rope(x, base)
    for component in range(3):
        moved = base.clone()
        moved[component] = 5
        cos, _ = rope(x, moved)
        changed = (cos != cos0)[0, 0, : head_dim // 2]
        expected = components == component
        assert int(expected.sum()) == section[component]
        if not interleaved:  # contiguous blocks in t, h, w order
            start = sum(section[:component])
            assert torch.equal(expected.nonzero().flatten(), torch.arange(start, start + section[component]))
        assert torch.equal(changed, expected), (component, changed)


def test_interleaved_layout_gives_every_axis_a_fast_frequency():
    """At the tiny recipe's head_dim 32 the sectioned layout leaves the width axis <= 0.0032 rad per column (left and
    right indistinguishable to attention); interleaved, every axis has a pair turning >= 0.3 rad per position."""
    head_dim = 32
    section = default_mrope_section(head_dim)
    sectioned = OmniRotaryEmbedding(head_dim, 10000.0, section, interleaved=False)
    assert float(sectioned.inv_freq[sectioned.component_of_freq == 2].max()) <= 0.0032
    interleaved = OmniRotaryEmbedding(head_dim, 10000.0, section, interleaved=True)
    for axis in range(3):
        assert float(interleaved.inv_freq[interleaved.component_of_freq == axis].max()) >= 0.3, axis


def test_frequencies_stay_fp32_when_the_model_is_cast_to_bf16(tmp_path):
    """`model.to(torch.bfloat16)` (what upcycle(dtype=bf16) ends with) and a bf16 reload keep RoPE's frequencies
    exact: bf16 rounding of inv_freq turns position 4095's angles by radians."""
    model = OmniMoeForCausalLM(tiny_config(media=False))
    exact = model.model.rotary_emb.inv_freq.clone()
    assert exact.dtype == torch.float32
    model.to(torch.bfloat16)
    assert model.model.embed_tokens.weight.dtype == torch.bfloat16  # the cast happened
    assert model.model.rotary_emb.inv_freq.dtype == torch.float32
    assert torch.equal(model.model.rotary_emb.inv_freq, exact)
    angle = 4095 * exact
    assert (angle - 4095 * exact.to(torch.bfloat16).float()).abs().max() > 0.1  # what the cast would have cost
    model.save_pretrained(tmp_path)
    loaded = OmniMoeForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16)
    assert loaded.model.rotary_emb.inv_freq.dtype == torch.float32
    assert torch.equal(loaded.model.rotary_emb.inv_freq, exact)
