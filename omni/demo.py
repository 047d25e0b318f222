"""`omni demo`: a tiny omni model, built from configs in seconds, on a real mixed-modality batch.

    omni demo [--seed 0] [--steps 3]

Trains a byte-level BPE tokenizer on a few sentences, builds a tiny OmniMoeConfig (CLIP vision + Whisper audio
encoders, modality-aware MoE in every layer), processes a batch of four conversations (text only, an image, a video
and an audio clip from the synthetic dataset's renderers), takes a few optimiser steps, prints the losses, the
parameter layout and where each modality's tokens were routed, then generates an answer from an image prompt.
"""

from __future__ import annotations

import argparse

import numpy as np
import torch
from transformers import CLIPVisionConfig, WhisperConfig

from omni_moe.data.synth import plan_sample, render_image, render_video, synth_digit_audio
from omni_moe.data.tokenizer import build_bpe_tokenizer
from omni_moe.modeling.configuration_omni import OmniMoeConfig
from omni_moe.modeling.modeling_omni import OmniMoeForCausalLM
from omni_moe.modeling.processing_omni import OmniMoeProcessor

SENTENCES = [
    "a red circle at the top left", "a blue square at the bottom right", "What colour is the shape?",
    "Which way does the square move?", "Transcribe the digits.", "How many beeps?", "Repeat: b d a", "4 7 1",
] * 4


def add_parser(sub) -> None:
    p = sub.add_parser("demo", help="a tiny omni model on a mixed text/image/video/audio batch (seconds, CPU)",
                       description=__doc__.split("\n\n")[0])
    p.add_argument("--seed", type=int, default=0, help="random seed")
    p.add_argument("--steps", type=int, default=3, help="optimiser steps to take on the batch")
    p.set_defaults(handler=run)


def tiny_omni_config(tokenizer) -> OmniMoeConfig:
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in ("<|image|>", "<|video|>", "<|audio|>", "<|endoftext|>")}
    return OmniMoeConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, num_intra_experts=2, num_inter_experts=2, num_shared_experts=1, num_null_experts=1,
        num_experts_per_tok=2, moe_intermediate_size=64, shared_expert_intermediate_size=64,
        vision_config=CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                       num_attention_heads=4, image_size=32, patch_size=8),
        audio_config=WhisperConfig(num_mel_bins=80, d_model=32, encoder_layers=2, encoder_attention_heads=4,
                                   encoder_ffn_dim=64, decoder_layers=1, decoder_attention_heads=4,
                                   decoder_ffn_dim=64, max_source_positions=50, vocab_size=len(tokenizer),
                                   pad_token_id=0, bos_token_id=0, eos_token_id=0, decoder_start_token_id=0),
        image_token_id=ids["<|image|>"], video_token_id=ids["<|video|>"], audio_token_id=ids["<|audio|>"],
        pad_token_id=ids["<|endoftext|>"], eos_token_id=tokenizer.eos_token_id,
    )


def demo_batch(seed: int):
    """Four conversations with media rendered by the synthetic dataset's own code."""
    tasks = ["image_colour", "video_direction", "audio_transcribe", "text_copy"]
    plans = {t: plan_sample(seed, "train", i, [t], 32) for i, t in enumerate(tasks)}
    image = render_image(plans["image_colour"].render, 32)
    video = render_video(plans["video_direction"].render, 32)
    audio = synth_digit_audio(plans["audio_transcribe"].render).astype(np.float32) / 32768.0

    def turn(task, media_type=None):
        plan = plans[task]
        parts = ([{"type": media_type}] if media_type else []) + [{"type": "text", "text": plan.question}]
        return [{"role": "user", "content": parts}, {"role": "assistant", "content": plan.answer}]

    conversations = [turn("text_copy"), turn("image_colour", "image"), turn("video_direction", "video"),
                     turn("audio_transcribe", "audio")]
    return conversations, [image], [video], [audio]


def parameter_layout(model: OmniMoeForCausalLM) -> tuple[int, int]:
    """(total, active per token): a token uses top-k routed experts per MoE layer, not all of them."""
    total = sum(p.numel() for p in model.parameters())
    inactive = 0
    for block in model.moe_blocks:
        per_expert = (block.experts.gate_up_proj.numel() + block.experts.down_proj.numel()) // block.experts.num_experts
        inactive += per_expert * (block.experts.num_experts - model.config.num_experts_per_tok)
    return total, total - inactive


def run(args: argparse.Namespace, rest=None) -> int:
    torch.manual_seed(args.seed)
    tokenizer = build_bpe_tokenizer(SENTENCES, vocab_size=320)
    config = tiny_omni_config(tokenizer)
    model = OmniMoeForCausalLM(config)
    processor = OmniMoeProcessor.from_config(config, tokenizer)
    conversations, images, videos, audios = demo_batch(args.seed)
    batch = processor(conversations, images=images, videos=videos, audios=audios)
    total, active = parameter_layout(model)
    pools = {name: f"{r.start}-{r.stop - 1}" for name, r in config.expert_pools().items() if len(r)}
    print(f"model: {total:,} parameters, {active:,} active per token; experts per MoE layer: {pools}")
    print(f"batch: input_ids {tuple(batch['input_ids'].shape)}, image {tuple(batch['pixel_values'].shape)}, "
          f"video {tuple(batch['pixel_values_videos'].shape)}, audio chunks {tuple(batch['audio_features'].shape)}")

    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for step in range(1, args.steps + 1):
        out = model(**batch)
        out.loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        print(f"step {step}: loss {out.loss.item():.4f} (ce {out.ce_loss.item():.4f}, aux {out.aux_loss.item():.4f}, "
              f"z {out.z_loss.item():.4f})")

    load = sum(r.tokens_per_expert for r in out.router_outputs)
    for m, name in enumerate(config.modalities):
        share = load[m] / load[m].sum().clamp(min=1)
        print(f"routing {name:>5}: " + " ".join(f"{x:.2f}" for x in share.tolist()))

    model.eval()
    prompt = processor([conversations[1][:1]], images=images, add_generation_prompt=True, return_labels=False)
    generated = model.generate(**prompt, max_new_tokens=8, do_sample=False)
    answer = processor.batch_decode(generated[:, prompt["input_ids"].shape[1]:])[0]
    print(f"generate (image prompt, untrained model): {answer!r}")
    return 0
