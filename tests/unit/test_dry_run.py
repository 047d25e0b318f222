"""`omni train recipes/real_scale.yaml --dry-run` without weights: real-sized config.json files only.

The test writes the published config.json of Qwen2.5-7B-Instruct, google/siglip-so400m-patch14-384 and
openai/whisper-large-v3 into a temporary folder (no weights, no tokenizer files) and points the recipe at them with
overrides. Parameter counts are checked against arithmetic on those configs written out here, independently of the
model code; the memory estimates are checked for the direction they must move in with ZeRO stage, EP size, world
size and activation checkpointing, and against a hand-computed case of the documented formula.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
RECIPE = REPO_ROOT / "recipes" / "real_scale.yaml"

QWEN25_7B_INSTRUCT = {
    "architectures": ["Qwen2ForCausalLM"], "attention_dropout": 0.0, "bos_token_id": 151643, "eos_token_id": 151645,
    "hidden_act": "silu", "hidden_size": 3584, "initializer_range": 0.02, "intermediate_size": 18944,
    "max_position_embeddings": 32768, "max_window_layers": 28, "model_type": "qwen2", "num_attention_heads": 28,
    "num_hidden_layers": 28, "num_key_value_heads": 4, "rms_norm_eps": 1e-06, "rope_theta": 1000000.0,
    "sliding_window": 131072, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
    "transformers_version": "4.43.1", "use_cache": True, "use_sliding_window": False, "vocab_size": 152064,
}
SIGLIP_SO400M_384 = {
    "architectures": ["SiglipModel"], "initializer_factor": 1.0, "model_type": "siglip",
    "text_config": {"hidden_size": 1152, "intermediate_size": 4304, "model_type": "siglip_text_model",
                    "num_attention_heads": 16, "num_hidden_layers": 27},
    "torch_dtype": "float32", "transformers_version": "4.37.0.dev0",
    "vision_config": {"hidden_size": 1152, "image_size": 384, "intermediate_size": 4304,
                      "model_type": "siglip_vision_model", "num_attention_heads": 16, "num_hidden_layers": 27,
                      "patch_size": 14},
}
WHISPER_LARGE_V3 = {
    "activation_dropout": 0.0, "activation_function": "gelu", "apply_spec_augment": False,
    "architectures": ["WhisperForConditionalGeneration"], "attention_dropout": 0.0,
    "begin_suppress_tokens": [220, 50257], "bos_token_id": 50257, "classifier_proj_size": 256, "d_model": 1280,
    "decoder_attention_heads": 20, "decoder_ffn_dim": 5120, "decoder_layerdrop": 0.0, "decoder_layers": 32,
    "decoder_start_token_id": 50258, "dropout": 0.0, "encoder_attention_heads": 20, "encoder_ffn_dim": 5120,
    "encoder_layerdrop": 0.0, "encoder_layers": 32, "eos_token_id": 50257, "init_std": 0.02,
    "is_encoder_decoder": True, "max_length": 448, "max_source_positions": 1500, "max_target_positions": 448,
    "median_filter_width": 7, "model_type": "whisper", "num_hidden_layers": 32, "num_mel_bins": 128,
    "pad_token_id": 50256, "scale_embedding": False, "torch_dtype": "float16", "use_cache": True,
    "use_weighted_layer_sum": False, "vocab_size": 51866,
}


@pytest.fixture(scope="module")
def overrides(tmp_path_factory) -> list[str]:
    """Recipe overrides pointing every model path at a folder holding only that model's config.json."""
    root = tmp_path_factory.mktemp("configs")
    paths = {}
    for name, config in (("qwen", QWEN25_7B_INSTRUCT), ("siglip", SIGLIP_SO400M_384), ("whisper", WHISPER_LARGE_V3)):
        (root / name).mkdir()
        (root / name / "config.json").write_text(json.dumps(config))
        paths[name] = root / name
    return [f"model.upcycle.dense_path={paths['qwen']}", f"model.upcycle.vision_path={paths['siglip']}",
            f"model.upcycle.audio_path={paths['whisper']}", f"model.tokenizer={paths['qwen']}",
            f"run.output_dir={root / 'run'}"]


@pytest.fixture(scope="module")
def recipe_with(overrides):
    from omni_moe.training.recipe import load_recipe

    return lambda *extra: load_recipe(RECIPE, [*overrides, *extra])


# ----------------------------------------------------------------------------- independent arithmetic
def qwen2_dense_parameters(c: dict) -> int:
    h, i, layers, v = c["hidden_size"], c["intermediate_size"], c["num_hidden_layers"], c["vocab_size"]
    kv = c["num_key_value_heads"] * (h // c["num_attention_heads"])
    attention = (h * h + h) + 2 * (h * kv + kv) + h * h  # q, k, v with biases; o without
    return 2 * v * h + layers * (attention + 3 * h * i + 2 * h) + h  # embeddings + untied head, layers, final norm


def siglip_vision_parameters(c: dict) -> int:
    d, f, layers, p = c["hidden_size"], c["intermediate_size"], c["num_hidden_layers"], c["patch_size"]
    patches = (c["image_size"] // p) ** 2
    layer = 4 * (d * d + d) + 2 * 2 * d + (d * f + f) + (f * d + d)  # attention, 2 LayerNorms, MLP
    head = d + (3 * d * d + 3 * d) + (d * d + d) + 2 * d + (d * f + f) + (f * d + d)  # probe, MHA, LN, MLP
    return 3 * p * p * d + d + patches * d + layers * layer + 2 * d + head


def whisper_encoder_parameters(c: dict) -> int:
    d, f, layers = c["d_model"], c["encoder_ffn_dim"], c["encoder_layers"]
    convs = c["num_mel_bins"] * d * 3 + d + d * d * 3 + d
    layer = (d * d + d) + d * d + (d * d + d) + (d * d + d) + 2 * d + (d * f + f) + (f * d + d) + 2 * d  # k: no bias
    return convs + c["max_source_positions"] * d + layers * layer + 2 * d


def expected_counts(upcycle: dict) -> tuple[int, int]:
    """(total, active per text token) of the recipe's upcycled model, from the configs and the recipe alone."""
    q = QWEN25_7B_INSTRUCT
    h, layers = q["hidden_size"], q["num_hidden_layers"]
    routed = 4 * upcycle["num_intra_experts"] + upcycle["num_inter_experts"]  # text, image, video, audio
    columns = routed + upcycle["num_null_experts"]
    expert = 3 * h * upcycle["moe_intermediate_size"]
    moe = routed * expert + 3 * h * upcycle["shared_expert_intermediate_size"] + h + columns * h  # + gate, router
    llm = qwen2_dense_parameters(q) - layers * 3 * h * q["intermediate_size"] + layers * moe
    vision, audio = SIGLIP_SO400M_384["vision_config"]["hidden_size"], WHISPER_LARGE_V3["d_model"]
    projectors = sum(d * h + h + h * h + h for d in (vision, audio))  # 2-layer MLPs into the LLM width
    total = llm + siglip_vision_parameters(SIGLIP_SO400M_384["vision_config"]) + \
        whisper_encoder_parameters(WHISPER_LARGE_V3) + projectors
    return total, llm - layers * (routed - upcycle["num_experts_per_tok"]) * expert


def test_the_arithmetic_matches_the_published_qwen25_7b_size():
    """Qwen2.5-7B(-Instruct) is published as 7.61 B parameters (7,615,616,512)."""
    assert qwen2_dense_parameters(QWEN25_7B_INSTRUCT) == 7_615_616_512


# ----------------------------------------------------------------------------- the dry run
def test_real_scale_dry_run_reads_configs_only_and_reports_counts_layout_and_memory(overrides, capsys,
                                                                                     monkeypatch):
    from omni.cli import main
    from omni_moe.training.recipe import load_recipe

    monkeypatch.setenv("NNODES", "4")
    assert main(["train", str(RECIPE), "--dry-run", *overrides]) == 0
    out = capsys.readouterr().out
    upcycle = load_recipe(RECIPE, overrides).model.upcycle
    line = next(l for l in out.splitlines() if l.startswith("parameters:"))
    total, active = (int(x.split()[-1].replace(",", "")) for x in line.removeprefix("parameters:").split(", active"))
    assert (total, active) == expected_counts(upcycle)
    assert 15e9 < total < 17e9 and 6e9 < active < 7e9  # what the recipe's header promises, roughly
    assert "16 routed" in out and "EP=8: 2 experts per rank" in out
    assert "  EP rank 0: 0 (text), 8 (inter)" in out and "  EP rank 7: 7 (audio), 15 (inter)" in out
    assert "4 node(s) x 8 processes = world 32" in out and "each EP rank replicated on 4" in out
    for stage in ("alignment", "modality_experts", "mixed_lora"):
        memory = next(l for l in out.splitlines() if l.startswith(f"  stage {stage}: trains"))
        assert "weights" in memory and "optimizer" in memory and "activations" in memory and "GiB" in memory
    host = next(l for l in out.splitlines() if l.startswith("host memory at each stage's start"))
    per_rank = f"{total * 2 / 2**30:,.2f} GiB per rank x 8 = {total * 16 / 2**30:,.2f} GiB a node"  # bf16
    assert per_rank in host, host


def test_memory_formula_on_a_hand_computed_case():
    """weights (P_dense + P_expert / E) x 4; ZeRO-2 fp32 gradients 4 bytes / N; AdamW moments 8 bytes / N, with
    N = W for dense and W / E for expert parameters."""
    from omni_moe.training.dry_run import state_bytes

    got = state_bytes(100, 80, 10, 40, world_size=4, ep_size=2, zero_stage=2, precision="fp32")
    assert got == ((100 + 40) * 4, 10 * 4 / 4 + 20 * 4 / 2, 10 * 8 / 4 + 20 * 8 / 2)
    weights, grads, optim = state_bytes(100, 80, 10, 40, world_size=4, ep_size=2, zero_stage=0, precision="bf16")
    assert (weights, grads, optim) == ((100 + 40) * 2, 10 * 2 + 20 * 2, 10 * 12 / 4 + 20 * 12 / 2)


def test_memory_moves_the_right_way_with_zero_stage_ep_size_world_and_checkpointing(recipe_with, monkeypatch):
    from omni_moe.training.dry_run import resolve_model_config, stage_memory

    config, _ = resolve_model_config(recipe_with())

    def estimate(*extra, world=32):
        recipe = recipe_with(*extra)
        stage = next(s for s in recipe.stages if s.name == "modality_experts")
        return stage_memory(recipe, stage, config, world)[0]

    fp32 = [estimate(f"parallel.zero_stage={z}", "parallel.precision=fp32") for z in (0, 1, 2)]
    assert fp32[0].optimizer > fp32[1].optimizer and fp32[1].gradients > fp32[2].gradients
    assert fp32[0].total > fp32[1].total > fp32[2].total
    assert len({e.weights for e in fp32}) == 1 and len({e.activations for e in fp32}) == 1
    bf16 = [estimate(f"parallel.zero_stage={z}") for z in (1, 2)]
    assert bf16[0].total > bf16[1].total and bf16[1].weights == fp32[2].weights // 2

    by_ep = [estimate(f"parallel.ep_size={ep}") for ep in (2, 4, 8)]
    assert by_ep[0].weights > by_ep[1].weights > by_ep[2].weights
    assert by_ep[0].total > by_ep[1].total > by_ep[2].total

    one_node, four_nodes = estimate(world=8), estimate(world=32)
    assert one_node.optimizer > four_nodes.optimizer and one_node.weights == four_nodes.weights

    without = estimate("train.activation_checkpointing=false")
    assert without.activations > estimate().activations > 0


def test_dry_run_names_a_bad_expert_parallel_size(recipe_with, monkeypatch):
    from omni_moe.training.dry_run import dry_run_report
    from omni_moe.training.recipe import RecipeError

    monkeypatch.setenv("NNODES", "1")
    # 16 routed experts do not split over 3 ranks (nproc 6 so that recipe validation lets ep_size=3 through)
    with pytest.raises(RecipeError, match=r"parallel.ep_size=3: .*num_routed_experts \(16\)"):
        dry_run_report(recipe_with("run.nproc_per_node=6", "parallel.ep_size=3"))
    monkeypatch.setenv("NNODES", "two")
    with pytest.raises(RecipeError, match="NNODES='two'"):
        dry_run_report(recipe_with())
