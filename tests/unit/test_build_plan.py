"""The build plan is the model the run builds (training/build.py): `plan_model` reads config.json files only, and
`build_model` turns the same plan into weights -- so the dry run (which prints the plan) and the run cannot drift.

Each source kind is built for real from tiny checkpoints saved here (a Qwen2 LLM, a SigLIP vision tower, a Whisper
audio encoder), and the built model's config must equal the plan's, field for field.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from transformers import Qwen2ForCausalLM, SiglipVisionModel, WhisperModel

from tests.tiny import tiny_audio_config, tiny_qwen2_config, tiny_vision_config
from omni_moe.training.build import build_model, meta_model, plan_model

IDS = {"<|image|>": 90, "<|video|>": 91, "<|audio|>": 92}


class Tokenizer:
    pad_token_id, eos_token_id = 0, 1

    def __len__(self) -> int:
        return 96

    def convert_tokens_to_ids(self, token: str) -> int:
        return IDS[token]


def comparable(config) -> dict:
    out = config.to_dict()
    for key in ("transformers_version", "dtype", "torch_dtype", "_name_or_path", "architectures"):
        out.pop(key, None)
    for sub in ("vision_config", "audio_config"):
        if isinstance(out.get(sub), dict):
            for key in ("transformers_version", "dtype", "torch_dtype", "_name_or_path", "architectures"):
                out[sub].pop(key, None)
    return out


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("checkpoints")
    Qwen2ForCausalLM(tiny_qwen2_config()).save_pretrained(root / "dense")
    SiglipVisionModel(tiny_vision_config("siglip")).save_pretrained(root / "vision")
    WhisperModel(tiny_audio_config()).save_pretrained(root / "audio")
    return root


def recipe_with(model: dict, **run):
    fields = {"from_": None, "upcycle": None, "config": None, "dense": None, "tokenizer": {"bpe_from": "x"}}
    fields.update(model)
    return SimpleNamespace(model=SimpleNamespace(**fields), run=SimpleNamespace(seed=run.get("seed", 0)))


MOE_STAGE = SimpleNamespace(preset="modality_experts")


def test_an_upcycled_model_is_its_plan(checkpoints):
    upcycle = {"dense_path": str(checkpoints / "dense"), "vision_path": str(checkpoints / "vision"),
               "audio_path": str(checkpoints / "audio"), "moe_intermediate_size": 64, "expert_init": "slice",
               "num_intra_experts": 2, "num_inter_experts": 1, "num_experts_per_tok": 2}
    plan = plan_model(recipe_with({"upcycle": upcycle}), MOE_STAGE, Tokenizer())
    assert plan.kind == "upcycle" and plan.folder == str(checkpoints / "dense")
    model = build_model(plan, torch.float32)
    assert comparable(model.config) == comparable(plan.config)
    assert model.config.audio_token_id == 92 and model.config.vision_config.model_type == "siglip_vision_model"
    # the dry run's meta model has the built model's every shape
    shapes = {n: p.shape for n, p in meta_model(plan).named_parameters()}
    assert shapes == {n: p.shape for n, p in model.named_parameters()}


def test_a_config_model_and_a_folder_model_are_their_plans(checkpoints, tmp_path):
    config = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
              "num_key_value_heads": 2, "num_intra_experts": 2, "num_inter_experts": 1, "moe_intermediate_size": 16,
              "shared_expert_intermediate_size": 16}
    plan = plan_model(recipe_with({"config": config}), MOE_STAGE, Tokenizer())
    assert plan.kind == "config" and plan.config.vocab_size == 96 and plan.config.image_token_id == 90
    model = build_model(plan, torch.bfloat16)
    assert comparable(model.config) == comparable(plan.config)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    model.save_pretrained(tmp_path / "stage")
    continued = plan_model(recipe_with({"config": config}), MOE_STAGE, Tokenizer(), source=tmp_path / "stage")
    assert continued.kind == "folder"  # a later stage continues from the previous stage's export, not model.config
    again = build_model(continued, torch.float32)
    assert comparable(again.config) == comparable(continued.config)
    assert all(torch.equal(a.float(), b) for a, b in zip(model.parameters(), again.parameters()))


def test_a_dense_pretrain_stage_plans_a_text_only_llm():
    dense = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
             "num_key_value_heads": 2}
    plan = plan_model(recipe_with({"dense": dense, "upcycle": {}}), SimpleNamespace(preset="dense_pretrain"),
                      Tokenizer())
    assert plan.kind == "dense_llm" and plan.config.vocab_size == 96
    model = build_model(plan, torch.float32)
    assert not model.moe_blocks
    assert not any(n.startswith("media.") for n, _ in model.named_parameters())
    assert comparable(model.config) == comparable(plan.config)
