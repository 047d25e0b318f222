"""The exported model card (omni/model_card.py): Hub front matter, expert layout per modality, stages, eval table."""

from __future__ import annotations

import json

import pytest
import yaml

from omni.loading import RunLocation
from omni.model_card import format_ids, parse_front_matter, render_model_card
from tests.tiny import tiny_config
from omni_moe.training.scoring import Prediction, score_predictions

CANARY = "hf_CANARY_model_card_4c1d9e"
EVAL = {"per_modality": {"text": 1.0, "image": 0.875, "video": 0.5, "audio": 0.25},
        "per_task": {"image_colour": {"accuracy": 0.875, "n": 8}, "text_copy": {"accuracy": 1.0, "n": 8}},
        "overall": 0.65625, "num_samples": 32}


@pytest.fixture
def run(tmp_path) -> RunLocation:
    """A run folder as `omni train` leaves it: recipe.yaml (3 stages), two stages done, an eval of the second."""
    recipe = {
        "run": {"output_dir": "runs/x", "nproc_per_node": 2},
        "model": {"config": {"hidden_size": 64}, "tokenizer": {"bpe_from": "m.jsonl"}},
        "data": {"sources": {"synth": "/private/place/shards/train", "speech": "/private/place/speech"}},
        "parallel": {"ep_size": 2, "zero_stage": 1, "precision": "fp32"},
        "stages": [
            {"name": "alignment", "preset": {"name": "alignment", "encoders_pretrained": False}, "steps": 8,
             "data": [{"source": "synth", "weight": 1.0}], "optimizer": {"lr": 3.0e-3}},
            {"name": "modality_experts", "preset": "modality_experts", "steps": 8,
             "data": [{"source": "synth", "weight": 3.0}, {"source": "speech", "weight": 1.0}]},
            {"name": "mixed_lora", "preset": {"name": "mixed_lora", "r": 4, "alpha": 8}, "steps": 8,
             "data": [{"source": "synth", "weight": 1.0}]},
        ],
    }
    output = tmp_path / "run"
    output.mkdir()
    (output / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    for name in ("alignment", "modality_experts"):
        (output / name).mkdir()
        (output / name / "DONE.json").write_text(json.dumps({"stage": name, "steps": 8}))
    (output / "modality_experts" / "eval.json").write_text(json.dumps(EVAL))
    return RunLocation(output_dir=output, stage="mixed_lora", recipe=recipe)


def test_front_matter_parses_with_the_required_keys(run):
    text = render_model_card(tiny_config(), run=run, stage="mixed_lora", step=6, adapter=True,
                             base_model="Qwen/Qwen2.5-0.5B-Instruct")
    assert text.startswith("---\n")
    matter = yaml.safe_load(text.split("---\n")[1])
    assert matter == parse_front_matter(text)
    assert matter["library_name"] == "transformers"
    assert matter["pipeline_tag"] == "any-to-any"  # image + audio encoders, text out
    assert matter["license"] == "apache-2.0" and matter["base_model"] == "Qwen/Qwen2.5-0.5B-Instruct"
    assert {"mixture-of-experts", "image", "video", "audio", "lora"} <= set(matter["tags"])


def test_pipeline_tag_follows_the_encoders():
    def tag(config) -> str:
        return parse_front_matter(render_model_card(config))["pipeline_tag"]

    assert tag(tiny_config(media=False)) == "text-generation"
    assert tag(tiny_config(audio_config=None)) == "image-text-to-text"


def test_expert_layout_lists_each_modalitys_global_expert_ids():
    text = render_model_card(tiny_config())
    header = "| modality | intra-modality experts | inter-modality experts | null experts |"
    assert header in text
    for row in ("| text | 0-1 | 8-9 | 10 |", "| image | 2-3 | 8-9 | 10 |", "| video | 4-5 | 8-9 | 10 |",
                "| audio | 6-7 | 8-9 | 10 |"):
        assert row in text
    # the table follows the router's allowed mask, not just the pool sizes
    assert "| image | 2-3 | none | 10 |" in render_model_card(tiny_config(use_inter_pool=False))


def test_stage_table_has_each_stages_training_data_mix_and_steps(run):
    text = render_model_card(tiny_config(), run=run, stage="mixed_lora", step=6)
    assert "| stage | trains | planned steps | steps run | data mix | LoRA | lr |" in text
    assert "| alignment | image_projector, audio_projector, vision_encoder, audio_encoder | 8 | 8 (done) | synth 100% |" in text
    assert "| modality_experts | intra_experts, routers | 8 | 8 (done) | synth 75%, speech 25% |" in text
    assert "| mixed_lora | lora, routers, image_projector, audio_projector | 8 | 6 (this export) | synth 100% | r=4, alpha=8" in text
    assert "expert parallelism 2, ZeRO-1, fp32" in text
    assert "/private/place" not in text  # data sources by name only


def test_eval_table_appears_when_a_stage_has_eval_json(run):
    text = render_model_card(tiny_config(), run=run, stage="mixed_lora", step=6)
    assert "### Stage `modality_experts`" in text
    assert "Overall exact match 0.6562 on 32 samples." in text
    assert "| image | 0.8750 |" in text and "| audio | 0.2500 |" in text
    assert "| task | accuracy | n |" in text and "| image_colour | 0.8750 | 8 |" in text
    (run.output_dir / "modality_experts" / "eval.json").unlink()
    assert "## Evaluation" not in render_model_card(tiny_config(), run=run, stage="mixed_lora", step=6)


def test_eval_table_shows_every_metric_the_eval_report_writes(run):
    """eval.json as training.stage_eval writes it: exact match and token F1 per group, WER where a group holds a
    transcription (meta.metric "wer")."""
    report = score_predictions([Prediction("a", "audio_transcribe", "audio", "q", "1 2 3 4", "1 2 3", "wer"),
                                Prediction("b", "image_colour", "image", "q", "red", "Red.")])
    (run.output_dir / "modality_experts" / "eval.json").write_text(json.dumps(report.to_dict(split="val")))
    text = render_model_card(tiny_config(), run=run, stage="mixed_lora", step=6)
    assert "Overall exact match 0.5000 on 2 samples." in text
    assert "| modality | n | exact_match | token_f1 | wer | wer_samples |" in text
    # "1 2 3" for "1 2 3 4": token F1 2 * 1 * 3/4 / (7/4), one deletion over 4 words
    assert "| audio | 1 | 0.0000 | 0.8571 | 0.2500 | 1 |" in text and "| image | 1 | 1.0000 | 1.0000 |  |  |" in text


def test_base_model_comes_from_a_local_upcycle_source_only_when_it_names_a_hub_repo(run, tmp_path):
    dense = tmp_path / "dense"
    dense.mkdir()
    (dense / "config.json").write_text(json.dumps({"_name_or_path": "Qwen/Qwen2.5-7B-Instruct"}))
    recipe = dict(run.recipe, model={"upcycle": {"dense_path": str(dense)}, "tokenizer": str(dense)})
    upcycled = RunLocation(output_dir=run.output_dir, stage="alignment", recipe=recipe)
    assert parse_front_matter(render_model_card(tiny_config(), run=upcycled))["base_model"] == "Qwen/Qwen2.5-7B-Instruct"
    (dense / "config.json").write_text(json.dumps({"_name_or_path": "/home/me/dense"}))
    assert "base_model" not in parse_front_matter(render_model_card(tiny_config(), run=upcycled))
    assert "base_model" not in parse_front_matter(render_model_card(tiny_config(), run=run))  # built from config


def test_secrets_are_scrubbed_from_the_card(run, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", CANARY)
    run.recipe["data"]["sources"] = {CANARY: "/x"}
    run.recipe["stages"][0]["data"] = [{"source": CANARY, "weight": 1.0}]
    text = render_model_card(tiny_config(), run=run, stage="mixed_lora", step=6)
    assert CANARY not in text and "<redacted:HF_TOKEN>" in text


def test_format_ids():
    assert format_ids([5, 0, 1, 2, 7, 8]) == "0-2, 5, 7-8"
    assert format_ids([]) == "none" and format_ids([3]) == "3"
