"""Stage hand-offs: what a finished stage leaves for the next one (and for users) in OUTPUT/<stage>/model.

    export_moe_model   experts gathered from every EP rank by global id, LoRA merged -> an OmniMoe HF folder
    export_dense_llm   a dense_pretrain stage's LLM as a plain transformers Qwen2ForCausalLM folder: exactly what
                       a user's pretrained LLM would be, the input of upcycling

Both are collective (every rank calls them); rank 0 writes into a staging folder and renames it into place, so a
crash never leaves a half-written model where the next stage looks.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from .distributed import barrier, get_rank


def _publish(write, out_dir: Path) -> None:
    """Rank 0: `write(staging)` then rename the staging folder to `out_dir`; every rank waits for it."""
    if get_rank() == 0:
        staging = out_dir.with_name(out_dir.name + ".tmp")
        shutil.rmtree(staging, ignore_errors=True)
        write(staging)
        shutil.rmtree(out_dir, ignore_errors=True)
        os.replace(staging, out_dir)
    barrier()


def export_moe_model(model, ep_group, out_dir: Path, tokenizer, processor) -> None:
    """Collective: the trained model as a HF folder -- LoRA merged, experts gathered from every EP rank by global
    id into a fresh single-device model."""
    from omni_moe.modeling.modeling_omni import OmniMoeForCausalLM

    from .expert_parallel import gather_full_expert_state, is_expert_key
    from .lora import merge_lora

    plain = merge_lora(model)
    experts = gather_full_expert_state(plain, ep_group)

    def write(staging: Path) -> None:
        state = {k: v.detach().cpu() for k, v in plain.state_dict().items() if not is_expert_key(k)}
        state.update(experts)
        fresh = OmniMoeForCausalLM(plain.config)
        fresh.load_state_dict(state, strict=True)
        fresh.save_pretrained(str(staging))
        tokenizer.save_pretrained(str(staging))
        processor.save_pretrained(str(staging))

    _publish(write, out_dir)


def export_dense_llm(model, out_dir: Path, tokenizer) -> None:
    """Collective: a dense OmniMoe LLM (no MoE layer, no media tower) as a transformers Qwen2ForCausalLM folder."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = model.config

    def write(staging: Path) -> None:
        qwen2 = Qwen2Config(
            vocab_size=config.vocab_size, hidden_size=config.hidden_size, intermediate_size=config.intermediate_size,
            num_hidden_layers=config.num_hidden_layers, num_attention_heads=config.num_attention_heads,
            num_key_value_heads=config.num_key_value_heads, head_dim=config.head_dim,
            max_position_embeddings=config.max_position_embeddings, rms_norm_eps=config.rms_norm_eps,
            rope_parameters={"rope_type": "default", "rope_theta": config.rope_theta},
            tie_word_embeddings=config.tie_word_embeddings, pad_token_id=config.pad_token_id,
            eos_token_id=config.eos_token_id,
        )
        dense = Qwen2ForCausalLM(qwen2)
        dense.load_state_dict({k: v.detach().cpu() for k, v in model.state_dict().items()}, strict=True)
        dense.save_pretrained(str(staging))
        tokenizer.save_pretrained(str(staging))

    _publish(write, out_dir)


__all__ = ["export_dense_llm", "export_moe_model"]
