"""Recipes: the shipped recipe loads, dotted overrides, errors that name the key, and the dry run."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from omni_moe.training.recipe import RecipeError, apply_overrides, load_recipe

REPO_ROOT = Path(__file__).resolve().parents[2]
TINY = REPO_ROOT / "recipes" / "tiny_omni.yaml"


def test_shipped_recipe_loads_and_starts_with_its_command():
    recipe = load_recipe(TINY)
    assert TINY.read_text().splitlines()[0] == "# omni train recipes/tiny_omni.yaml"
    assert [s.name for s in recipe.stages] == ["dense_llm", "alignment", "modality_experts", "mixed_lora"]
    assert [s.preset for s in recipe.stages] == ["dense_pretrain", "alignment", None, "mixed_lora"]
    assert {"intra_experts", "routers", "attention"} <= set(recipe.stages[2].train)
    assert recipe.run.nproc_per_node == 2 and recipe.parallel.ep_size == 2 and recipe.parallel.zero_stage == 2
    assert recipe.stages[3].lora is not None and recipe.model.dense is not None and recipe.model.upcycle is not None
    # relative sources are read under data.root (one shard set per task, made by `omni train` from data.synth)
    root = Path(recipe.data.root)
    assert recipe.data.synth["out"] == "runs/synth" and root == Path("runs/synth/shards/train")
    assert recipe.data.sources["text"] == [str(root / t) for t in ("text_copy", "text_reverse", "text_add")]


def test_dense_pretrain_stage_rules():
    with pytest.raises(RecipeError, match="dense_pretrain stage must be stages.0"):
        load_recipe(TINY, ["stages.1.preset=dense_pretrain"])
    with pytest.raises(RecipeError, match="dense_pretrain stage must be stages.0"):
        load_recipe(TINY, ["model.dense=null"])
    with pytest.raises(RecipeError, match="model.dense is only used by a dense_pretrain stage"):
        load_recipe(TINY, ["stages.0.preset=alignment"])


def test_overrides_nested_list_index_and_yaml_scalars():
    recipe = load_recipe(TINY, ["train.save_every=2", "stages.0.steps=10", "parallel.ep_size=1",
                                "stages.1.optimizer.lr=1e-3", "train.activation_checkpointing=true",
                                "data.batching.batch_size=2", "train.stop_after_steps=null"])
    assert recipe.train.save_every == 2 and recipe.stages[0].steps == 10 and recipe.parallel.ep_size == 1
    assert recipe.stages[1].optimizer.lr == 1e-3 and recipe.train.activation_checkpointing is True
    assert recipe.data.batching["batch_size"] == 2 and recipe.train.stop_after_steps is None
    # a whole list as a YAML flow value replaces the stages
    recipe = load_recipe(TINY, ["stages=[{name: only, preset: modality_experts, steps: 3}]", "model.dense=null",
                                "model.upcycle.dense_path=/some/dense_llm"])
    assert [(s.name, s.steps) for s in recipe.stages] == [("only", 3)]
    raw = {"a": [{"b": 1}]}
    assert apply_overrides(raw, ["a.0.b=2"]) == {"a": [{"b": 2}]} and raw == {"a": [{"b": 1}]}  # a copy


@pytest.mark.parametrize("override, message", [
    ("train.save_every=often", "train.save_every must be int"),
    ("parallel.ep_size=1.5", "parallel.ep_size must be int"),
    ("stages.0.steps=-1", "steps must be a positive integer"),
    ("stages.7.steps=3", "stages.7 is not an index"),
    ("train.save_evry=3", "unknown key train.save_evry"),
    ("trian.save_every=3", "unknown key trian"),
    ("parallel.zero_stage=3", "parallel.zero_stage must be 0, 1 or 2"),
    ("stages.0.data.0.source=nope", "stages.0.data.0.source: 'nope' is not one of data.sources"),
    ("parallel.ep_size=0", "parallel.ep_size must be >= 1"),
    ("train.save_every", "expected KEY=VALUE"),
])
def test_bad_values_and_keys_name_the_key(override, message):
    with pytest.raises(RecipeError, match=message.replace(".", r"\.").replace("(", r"\(")):
        load_recipe(TINY, [override])


def test_missing_and_conflicting_model_sections(tmp_path):
    raw = yaml.safe_load(TINY.read_text())
    del raw["run"]["output_dir"]
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(RecipeError, match=r"missing key run\.output_dir"):
        load_recipe(path)
    with pytest.raises(RecipeError, match="exactly one of config, upcycle or from"):
        load_recipe(TINY, ["model.from=/some/folder"])


def test_dry_run_prints_config_data_plan_and_parameter_layout(capsys):
    from omni.cli import main

    assert main(["train", str(TINY), "--dry-run", "stages.0.steps=5"]) == 0
    out = capsys.readouterr().out
    assert "steps: 5" in out  # the resolved config, overrides applied
    assert "stage dense_llm: 5 steps" in out and "runs/synth/shards/train" in out
    line = next(l for l in out.splitlines() if l.startswith("parameters:"))
    total, active = (int(x.split()[-1].replace(",", "")) for x in line.removeprefix("parameters:").split(", active"))
    assert 0 < active < total
    assert "10 routed" in out and "EP=2: 5 experts per rank" in out


def test_a_pretrained_llms_tokenizer_gets_the_media_placeholders(tmp_path):
    """The real-scale recipe names a Qwen2.5 folder as its tokenizer: it has ChatML's tokens but not our media
    placeholders. `omni train` adds them (appended, existing ids unchanged) and refuses a checkpoint whose
    embeddings have no row for them."""
    from types import SimpleNamespace

    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from omni_moe.modeling.configuration_omni import OmniMoeConfig
    from omni_moe.training.build import load_tokenizer, placeholder_ids

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    qwen_like = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                        extra_special_tokens=["<|im_start|>"])
    folder = tmp_path / "qwen_like"
    qwen_like.save_pretrained(folder)
    before = {t: qwen_like.convert_tokens_to_ids(t) for t in ("<|endoftext|>", "<|im_start|>", "<|im_end|>")}
    recipe = SimpleNamespace(model=SimpleNamespace(tokenizer=str(folder)), run=SimpleNamespace(output_dir=tmp_path))
    tokenizer = load_tokenizer(recipe, None)
    ids = placeholder_ids(tokenizer)
    assert all(isinstance(i, int) for i in ids.values()) and len(set(ids.values())) == 3, ids
    assert min(ids.values()) >= len(qwen_like) and len(tokenizer) == len(qwen_like) + 3
    assert {t: tokenizer.convert_tokens_to_ids(t) for t in before} == before
    assert placeholder_ids(load_tokenizer(recipe, None)) == ids  # every rank, every stage: the same ids
    OmniMoeConfig(vocab_size=len(tokenizer), **ids)  # Qwen2.5: padded embeddings, room to spare
    with pytest.raises(ValueError, match=r"image_token_id=\d+, video_token_id=\d+, audio_token_id=\d+ outside the "
                                         r"vocabulary \(vocab_size \d+\).*resize"):
        OmniMoeConfig(vocab_size=len(qwen_like), **ids)  # embeddings without spare rows


def test_upcycling_refuses_a_tokenizer_longer_than_the_checkpoints_embeddings(tmp_path):
    """Checked when the config is made from the dense config.json, before the (at real scale, minutes-long) model
    build: the folder has no weights, so reaching them would fail differently."""
    from types import SimpleNamespace

    from transformers import Qwen2Config

    from omni_moe.training.build import plan_model

    dense = tmp_path / "dense"
    dense.mkdir()
    Qwen2Config(vocab_size=8, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                num_key_value_heads=1).save_pretrained(dense)  # no weights: the check must come first
    ids = {"<|image|>": 5, "<|video|>": 8, "<|audio|>": 9}  # appended past the checkpoint's 8 embedding rows
    tokenizer = type("Tokenizer", (), {"__len__": lambda self: 10, "convert_tokens_to_ids": lambda self, t: ids[t],
                                       "pad_token_id": None, "eos_token_id": None})()
    recipe = SimpleNamespace(model=SimpleNamespace(from_=None, upcycle={"dense_path": str(dense)}),
                             run=SimpleNamespace(seed=0), parallel=SimpleNamespace(precision="bf16"))
    with pytest.raises(ValueError, match=r"video_token_id=8, audio_token_id=9 outside the vocabulary \(vocab_size 8\)"):
        plan_model(recipe, SimpleNamespace(preset="modality_experts"), tokenizer)


def test_a_bf16_run_builds_every_stage_model_in_bf16(tmp_path):
    """No fp32 copy of the model on a bf16 run (at real scale: 63 GB per rank), neither upcycled nor loaded from an
    earlier stage's (fp32) folder; an fp32 run stays fp32."""
    from types import SimpleNamespace

    import torch
    from transformers import Qwen2ForCausalLM

    from tests.tiny import tiny_qwen2_config
    from omni_moe.training.build import build_model, compute_dtype, plan_model

    Qwen2ForCausalLM(tiny_qwen2_config()).to(torch.bfloat16).save_pretrained(tmp_path / "dense")
    ids = {"<|image|>": 90, "<|video|>": 91, "<|audio|>": 92}
    tokenizer = type("Tokenizer", (), {"__len__": lambda self: 93, "convert_tokens_to_ids": lambda self, t: ids[t],
                                       "pad_token_id": None, "eos_token_id": None})()
    stage = SimpleNamespace(preset="modality_experts")
    upcycle = {"dense_path": str(tmp_path / "dense"), "moe_intermediate_size": 32, "expert_init": "slice"}
    for precision, dtype in (("bf16", torch.bfloat16), ("fp32", torch.float32)):
        recipe = SimpleNamespace(model=SimpleNamespace(from_=None, upcycle=upcycle), run=SimpleNamespace(seed=0),
                                 parallel=SimpleNamespace(precision=precision))
        assert compute_dtype(recipe) == dtype
        model = build_model(plan_model(recipe, stage, tokenizer), dtype)
        assert {p.dtype for p in model.parameters()} == {dtype}, precision
        assert model.config.audio_token_id == 92
        model.to(torch.float32).save_pretrained(tmp_path / precision)  # stage folders hold fp32 (master) weights
        loaded = build_model(plan_model(recipe, stage, tokenizer, source=tmp_path / precision), dtype)
        assert {p.dtype for p in loaded.parameters()} == {dtype}, precision
        assert all(b.gate.e_score_correction_bias.dtype == torch.float32 for b in loaded.moe_blocks)
