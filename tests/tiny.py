"""Tiny configs shared by the tests: small enough for 2 CPU cores, real enough to run every code path."""

from __future__ import annotations

import torch
from transformers import CLIPVisionConfig, Qwen2Config, SiglipVisionConfig, WhisperConfig

from omni_moe.modeling.configuration_omni import OmniMoeConfig

VOCAB = 96
# placeholder ids live at the top of the tiny vocabulary
IMAGE_ID, VIDEO_ID, AUDIO_ID = VOCAB - 3, VOCAB - 2, VOCAB - 1


def tiny_vision_config(kind: str = "clip", **kw):
    common = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=32, patch_size=8)
    common.update(kw)
    return CLIPVisionConfig(**common) if kind == "clip" else SiglipVisionConfig(**common)


def tiny_audio_config(**kw):
    common = dict(
        num_mel_bins=80, d_model=32, encoder_layers=2, encoder_attention_heads=4, encoder_ffn_dim=64,
        decoder_layers=1, decoder_attention_heads=4, decoder_ffn_dim=64, max_source_positions=50,
        max_target_positions=32, vocab_size=VOCAB, pad_token_id=0, bos_token_id=1, eos_token_id=1,
        decoder_start_token_id=1,
    )
    common.update(kw)
    return WhisperConfig(**common)


def tiny_llm_fields(**kw):
    fields = dict(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, rms_norm_eps=1e-6, rope_theta=10000.0, max_position_embeddings=512,
        tie_word_embeddings=False,
    )
    fields.update(kw)
    return fields


def tiny_config(media: bool = True, **kw) -> OmniMoeConfig:
    fields = tiny_llm_fields()
    fields.update(
        num_intra_experts=2, num_inter_experts=2, num_shared_experts=1, num_null_experts=1, num_experts_per_tok=2,
        moe_intermediate_size=32, shared_expert_intermediate_size=32,
        image_token_id=IMAGE_ID, video_token_id=VIDEO_ID, audio_token_id=AUDIO_ID, pad_token_id=0, eos_token_id=1,
    )
    if media:
        fields.update(vision_config=tiny_vision_config(), audio_config=tiny_audio_config())
    fields.update(kw)
    return OmniMoeConfig(**fields)


def tiny_qwen2_config(**kw) -> Qwen2Config:
    fields = tiny_llm_fields()
    theta = fields.pop("rope_theta")
    fields.update(rope_parameters={"rope_type": "default", "rope_theta": theta}, pad_token_id=0, eos_token_id=1)
    fields.update(kw)
    return Qwen2Config(**fields)


def right_padded(rows: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask) for token rows of different lengths, padded on the right with id 0."""
    width = max(map(len, rows))
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = torch.tensor(row)
        mask[i, : len(row)] = 1
    return ids, mask


TINY_TEXTS = [
    "Describe the image.", "a red circle at the top left", "Transcribe the digits.", "1 2 3", "What is 2 plus 3?",
    "Which way does the square move?", "left right up down", "Repeat: a b c", "How many beeps?", "blue green cyan",
]


def save_tiny_omni_folder(path, seed: int = 0, **config_overrides):
    """A tiny random OmniMoeForCausalLM saved as an exported HF folder (weights, tokenizer with the chat template,
    processor) at `path`; returns `path`. The model's vocabulary is the BPE tokenizer's."""
    from omni_moe.data.tokenizer import build_bpe_tokenizer
    from omni_moe.modeling.modeling_omni import OmniMoeForCausalLM
    from omni_moe.modeling.processing_omni import OmniMoeProcessor
    from omni_moe.modeling.tokenizer_utils import AUDIO_TOKEN, IMAGE_TOKEN, VIDEO_TOKEN

    tokenizer = build_bpe_tokenizer(TINY_TEXTS, vocab_size=300)
    ids = {key: tokenizer.convert_tokens_to_ids(tok) for key, tok in
           (("image_token_id", IMAGE_TOKEN), ("video_token_id", VIDEO_TOKEN), ("audio_token_id", AUDIO_TOKEN))}
    config = tiny_config(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
                         eos_token_id=tokenizer.eos_token_id, **ids, **config_overrides)
    torch.manual_seed(seed)
    model = OmniMoeForCausalLM(config).eval()
    processor = OmniMoeProcessor.from_config(config, tokenizer)
    model.save_pretrained(str(path))
    tokenizer.save_pretrained(str(path))
    processor.save_pretrained(str(path))
    return path
