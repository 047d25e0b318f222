"""`omni eval` on a tiny random exported model and a tiny synthetic dataset (two samples per task)."""

import json

import pytest
import torch

from data.synth import TASKS, generate, word_accuracy
from omni.cli import main
from omni.evaluate import Prediction, generate_answers, load_split, score_predictions
from omni.loading import load_model_and_processor
from tests.tiny import save_tiny_omni_folder

SAMPLES_PER_TASK = 2


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("synth")
    generate(root, splits={"test": SAMPLES_PER_TASK * len(TASKS)})
    return root


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_omni_folder(tmp_path_factory.mktemp("tiny_model"), seed=0)


def test_cli_end_to_end_writes_table_and_json_with_routing(dataset, model_dir, tmp_path, capsys):
    out = tmp_path / "report" / "eval.json"
    rc = main(["eval", str(model_dir), "--data", str(dataset), "--split", "test", "--batch-size", "8",
               "--max-new-tokens", "4", "--json", str(out), "--routing"])
    assert rc == 0
    table = capsys.readouterr().out
    assert "overall" in table and "image_caption" in table and "uniform intra" in table

    report = json.loads(out.read_text())
    total = SAMPLES_PER_TASK * len(TASKS)
    assert report["num_samples"] == total and report["split"] == "test" and report["checkpoint"] == str(model_dir)
    assert set(report["per_modality"]) == {"text", "image", "video", "audio"}
    assert set(report["per_task"]) == set(TASKS)
    assert all(r["n"] == SAMPLES_PER_TASK for r in report["per_task"].values())
    expected_per_modality = {m: SAMPLES_PER_TASK * sum(t.modality == m for t in TASKS.values())
                             for m in report["per_modality"]}
    assert {m: r["n"] for m, r in report["per_modality"].items()} == expected_per_modality
    # overall is the micro average: it must agree with the per-task numbers
    correct = sum(r["n"] * r["exact_match"] for r in report["per_task"].values())
    assert report["overall"] == pytest.approx(correct / total)
    assert report["examples"] and {"question", "answer", "prediction"} <= set(report["examples"][0])

    routing = report["routing"]
    assert routing["num_moe_layers"] == 2 and set(routing["per_modality"]) == {"text", "image", "video", "audio"}
    for name, shares in routing["per_modality"].items():
        parts = shares["intra"] + shares["inter"] + shares["other_pools"] + shares["null"]
        assert parts == pytest.approx(1.0, abs=1e-9), name
        assert shares["other_pools"] == 0.0, name  # masked router columns get exactly zero probability
        assert shares["tokens"] > 0 and shares["intra"] > 0 and shares["inter"] > 0
        # tiny_config: 2 intra + 2 inter + 1 null allowed columns per modality
        assert shares["uniform_intra_share"] == pytest.approx(2 / 5)


def test_limit_is_respected(dataset, model_dir, tmp_path):
    out = tmp_path / "eval.json"
    assert main(["eval", str(model_dir), "--data", str(dataset), "--limit", "3", "--batch-size", "2",
                 "--max-new-tokens", "2", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    first = load_split(dataset, "test")[:3]
    assert report["num_samples"] == 3
    assert sum(r["n"] for r in report["per_task"].values()) == 3
    assert set(report["per_task"]) == {s["meta"]["task"] for s in first}


def test_batched_left_padded_generation_equals_one_sample_at_a_time(dataset, model_dir):
    model, processor = load_model_and_processor(model_dir)
    # a non-trivial model: the random init's near-uniform logits make greedy decoding a comparison of ties
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    samples = load_split(dataset, "test")
    batched = generate_answers(model, processor, samples, dataset, batch_size=len(samples), max_new_tokens=6)
    single = [generate_answers(model, processor, [s], dataset, batch_size=1, max_new_tokens=6)[0] for s in samples]
    assert len(set(single)) > 1, "degenerate model: every answer is the same, the comparison would prove nothing"
    for sample, one, together in zip(samples, single, batched):
        assert together == one, sample["id"]


def test_evaluate_restores_training_mode(dataset, model_dir):
    from omni.evaluate import evaluate

    model, processor = load_model_and_processor(model_dir)
    model.train()
    report = evaluate(model, processor, load_split(dataset, "test", limit=2), dataset, max_new_tokens=1)
    assert model.training and report.num_samples == 2


def test_scoring_normalises_and_aggregates_per_task_and_modality():
    cases = [  # (task, modality, prediction, answer, correct after normalize_answer)
        ("image_colour", "image", "Red.", "red", True),
        ("image_colour", "image", "  blue   green ", "blue green", True),
        ("image_colour", "image", "red", "blue", False),
        ("image_caption", "image", "A Cross at the TOP left", "a cross at the top left.", True),
        ("audio_transcribe", "audio", "1 2", "12", False),
        ("audio_transcribe", "audio", "1 2 3..", "1 2 3", False),  # only ONE trailing period is dropped
    ]
    predictions = [Prediction(f"s{i}", task, modality, "q?", answer, prediction)
                   for i, (task, modality, prediction, answer, _) in enumerate(cases)]
    assert [p.correct for p in predictions] == [c[-1] for c in cases]
    report = score_predictions(predictions)
    # word accuracy: "1 2" vs "12" has no word right (0/2); "1 2 3." vs "1 2 3" two of three
    assert report.per_task == {
        "audio_transcribe": {"n": 2, "exact_match": 0.0, "word_accuracy": pytest.approx(1 / 3)},
        "image_caption": {"n": 1, "exact_match": 1.0, "word_accuracy": 1.0},
        "image_colour": {"n": 3, "exact_match": pytest.approx(2 / 3), "word_accuracy": pytest.approx(2 / 3)},
    }
    assert report.per_modality == {"audio": {"n": 2, "exact_match": 0.0, "word_accuracy": pytest.approx(1 / 3)},
                                   "image": {"n": 4, "exact_match": 0.75, "word_accuracy": 0.75}}
    assert report.overall == pytest.approx(3 / 6) and report.num_samples == 6
    assert "66.7 %" in report.format_table() and "50.0 %" in report.format_table()
    assert report.to_dict(checkpoint="c", split="val")["per_task"]["image_caption"]["exact_match"] == 1.0


def test_word_accuracy_gives_partial_credit_in_place():
    assert word_accuracy("a red cross at the top left", "a red circle at the top right") == pytest.approx(5 / 7)
    assert word_accuracy("6 5 8", "6 1 7") == pytest.approx(1 / 3)
    assert word_accuracy("1 2 3 4", "1 2") == pytest.approx(2 / 4)  # extra words cost
    assert word_accuracy("2 1", "1 2") == 0.0  # right words, wrong places
    assert word_accuracy("Top Left.", "top left") == 1.0 and word_accuracy("", "") == 1.0
    assert word_accuracy("", "red") == 0.0


def test_missing_dataset_or_split_is_a_clear_error(dataset, model_dir, tmp_path, capsys):
    assert main(["eval", str(model_dir), "--data", str(tmp_path / "nowhere")]) == 2
    assert f"{tmp_path / 'nowhere'}: no such dataset folder" in capsys.readouterr().err
    assert main(["eval", str(model_dir), "--data", str(dataset), "--split", "val"]) == 2
    err = capsys.readouterr().err
    assert "val.jsonl: no such split file" in err and "['test']" in err


def test_help_lists_every_flag(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["eval", "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for flag in ("--data", "--split", "--limit", "--batch-size", "--max-new-tokens", "--json", "--routing"):
        assert flag in text
