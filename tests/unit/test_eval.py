"""Evaluation (training/evaluation.py) and `omni eval` on a tiny random exported model: a tiny synthetic dataset (two
samples per task) and a hand-written manifest that is not the synthetic generator's."""

import json
import wave

import numpy as np
import pytest
import torch
from PIL import Image

from omni_moe.data.synth import TASKS, generate
from omni.cli import main
from omni.loading import load_model_and_processor
from tests.tiny import save_tiny_omni_folder
from omni_moe.training.evaluation import evaluate, generate_answers, load_split
from omni_moe.training.scoring import exact_match, token_f1, word_edits

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
    # two samples per task: the examples are every prediction, so the scores can be recomputed from them
    for task, scores in report["per_task"].items():
        shown = [e for e in report["examples"] if e["task"] == task]
        assert len(shown) == scores["n"] and all(e["correct"] == exact_match(e["prediction"], e["answer"])
                                                 for e in shown)
        assert scores["exact_match"] == pytest.approx(sum(e["correct"] for e in shown) / len(shown))
        assert scores["token_f1"] == pytest.approx(sum(token_f1(e["prediction"], e["answer"]) for e in shown)
                                                   / len(shown))
        if task == "audio_transcribe":  # the synthetic transcription declares meta.metric "wer"
            edits, words = map(sum, zip(*(word_edits(e["prediction"], e["answer"]) for e in shown)))
            assert scores["wer"] == pytest.approx(edits / words) and scores["wer_samples"] == SAMPLES_PER_TASK
        else:
            assert "wer" not in scores, task
    assert report["per_modality"]["audio"]["wer_samples"] == SAMPLES_PER_TASK  # audio_count is not part of it
    assert report["per_modality"]["audio"]["wer"] == report["per_task"]["audio_transcribe"]["wer"]
    assert not any("wer" in report["per_modality"][m] for m in ("text", "image", "video"))
    assert report["overall_scores"]["n"] == total and report["overall_scores"]["exact_match"] == report["overall"]
    assert "token F1" in table and "WER" in table

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
    model, processor = load_model_and_processor(model_dir)
    model.train()
    report = evaluate(model, processor, load_split(dataset, "test", limit=2), dataset, max_new_tokens=1)
    assert model.training and report.num_samples == 2


def _write_foreign_dataset(root):
    """A manifest in the canonical format written by hand, not by data/synth.py: a system prompt, a multi-turn image
    conversation, no meta at all on one sample (task and modality inferred), a speech-style metric declared per
    sample, a WAV and a PNG of its own."""
    (root / "media").mkdir(parents=True)
    Image.fromarray(np.full((32, 32, 3), (200, 40, 40), dtype=np.uint8)).save(root / "media" / "red.png")
    for name, seconds in (("one.wav", 0.4), ("two.wav", 0.6)):
        t = np.arange(int(16000 * seconds)) / 16000
        with wave.open(str(root / "media" / name), "wb") as handle:
            handle.setnchannels(1)
            handle.setsampwidth(2)
            handle.setframerate(16000)
            handle.writeframes((0.3 * np.sin(2 * np.pi * 440 * t) * 32767).astype("<i2").tobytes())
    samples = [
        {"id": "chat-1", "messages": [{"role": "system", "content": "Answer briefly."},
                                      {"role": "user", "content": "What is 2 plus 3?"},
                                      {"role": "assistant", "content": "5"}]},
        {"id": "vqa-1", "images": ["media/red.png"], "meta": {"task": "vqa"},
         "messages": [{"role": "user", "content": "<image>\nDescribe the image."},
                      {"role": "assistant", "content": "a red square"},
                      {"role": "user", "content": "Which colour is it?"},
                      {"role": "assistant", "content": "Red."}]},
        {"id": "asr-1", "audios": ["media/one.wav"], "meta": {"task": "asr", "metric": "wer"},
         "messages": [{"role": "user", "content": "<audio>\nTranscribe the digits."},
                      {"role": "assistant", "content": "1 2 3"}]},
        {"id": "asr-2", "audios": ["media/two.wav"], "meta": {"task": "asr", "metric": "wer"},
         "messages": [{"role": "user", "content": "<audio>\nTranscribe the digits."},
                      {"role": "assistant", "content": "4 5 6 7"}]},
    ]
    (root / "test.jsonl").write_text("".join(json.dumps(s) + "\n" for s in samples), encoding="utf-8")
    return root


def test_a_manifest_not_from_the_synthetic_generator_is_scored_end_to_end(model_dir, tmp_path):
    data_dir = _write_foreign_dataset(tmp_path / "foreign")
    model, processor = load_model_and_processor(model_dir)
    samples = load_split(data_dir, "test")
    report = evaluate(model, processor, samples, data_dir, batch_size=3, max_new_tokens=4)
    assert set(report.per_task) == {"unspecified", "vqa", "asr"}
    assert set(report.per_modality) == {"text", "image", "audio"}
    by_id = {p.sample_id: p for p in report.predictions}
    # the reference is the LAST assistant turn; the question the last user turn before it
    assert (by_id["vqa-1"].answer, by_id["vqa-1"].question) == ("Red.", "Which colour is it?")
    assert by_id["chat-1"].task == "unspecified" and by_id["chat-1"].modality == "text"
    assert [by_id[i].metric for i in ("chat-1", "vqa-1", "asr-1", "asr-2")] == [None, None, "wer", "wer"]
    # the predictions are the model's greedy answers, each with its own sample
    answers = generate_answers(model, processor, samples, data_dir, batch_size=3, max_new_tokens=4)
    assert [by_id[s["id"]].prediction for s in samples] == answers
    asr = report.per_task["asr"]
    edits, words = map(sum, zip(*(word_edits(by_id[i].prediction, by_id[i].answer) for i in ("asr-1", "asr-2"))))
    assert words == 7 and asr["wer"] == pytest.approx(edits / 7) and asr["wer_samples"] == 2
    assert report.per_modality["audio"] == asr and "wer" not in report.per_task["vqa"]
    assert report.per_task["vqa"]["token_f1"] == pytest.approx(token_f1(by_id["vqa-1"].prediction, "red"))
    assert report.overall == pytest.approx(sum(exact_match(p.prediction, p.answer) for p in by_id.values()) / 4)


def test_a_bad_metric_in_a_manifest_is_an_error_naming_the_sample(tmp_path):
    bad = {"id": "x", "meta": {"metric": "bleu"},
           "messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}
    (tmp_path / "test.jsonl").write_text(json.dumps(bad) + "\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"test.jsonl.*meta.metric 'bleu' is not one of"):
        load_split(tmp_path, "test")


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
