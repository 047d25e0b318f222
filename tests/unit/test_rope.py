"""Omni 3D RoPE reduces exactly to 1-D RoPE when the three position rows are equal."""

import torch
from transformers.models.qwen2.modeling_qwen2 import Qwen2RotaryEmbedding, apply_rotary_pos_emb

from modeling.configuration_omni import default_mrope_section
from modeling.rope import OmniRotaryEmbedding, apply_omni_rotary
from tests.tiny import tiny_qwen2_config


def test_equal_components_equal_qwen2_rope():
    cfg = tiny_qwen2_config()
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    ours = OmniRotaryEmbedding(head_dim, 10000.0, default_mrope_section(head_dim))
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


def test_components_drive_their_own_sections():
    head_dim = 16
    section = default_mrope_section(head_dim)
    rope = OmniRotaryEmbedding(head_dim, 10000.0, section)
    x = torch.zeros(1)
    base = torch.zeros(3, 1, 1, dtype=torch.long)
    cos0, _ = rope(x, base)
    for component in range(3):
        moved = base.clone()
        moved[component] = 5
        cos, _ = rope(x, moved)
        changed = (cos != cos0)[0, 0, : head_dim // 2]
        start = sum(section[:component])
        expected = torch.zeros(head_dim // 2, dtype=torch.bool)
        expected[start : start + section[component]] = True
        assert torch.equal(changed, expected), (component, changed)
