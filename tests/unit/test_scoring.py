"""The eval metrics (training/scoring.py) against hand-worked cases, and their aggregation per modality and task."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from omni_moe.training.scoring import (
    Prediction,
    exact_match,
    group_scores,
    normalize_answer,
    score_predictions,
    token_f1,
    word_edits,
    word_error_rate,
)


def test_normalisation_is_case_whitespace_and_one_trailing_period():
    assert normalize_answer("  Top   Left. ") == "top left"
    assert normalize_answer("1 2 3..") == "1 2 3."  # only ONE trailing period is dropped
    assert normalize_answer("e.g. a") == "e.g. a"  # inner periods stay
    assert normalize_answer(" . ") == "" and normalize_answer("") == ""


def test_exact_match():
    assert exact_match("  Top   Left. ", "top left")
    assert exact_match("4 7 1", "4  7 1.")
    assert exact_match("", "")
    assert not exact_match("4 7", "4 7 1")
    assert not exact_match("red circle", "red")
    assert not exact_match("1 2", "12")


@pytest.mark.parametrize("prediction, reference, expected", [
    ("a red circle", "A red circle.", 1.0),
    ("2 1", "1 2", 1.0),                      # a bag of tokens: order does not matter
    ("blue", "red", 0.0),
    ("a red circle", "a blue circle", 2 / 3),  # 2 shared: precision 2/3, recall 2/3
    ("red", "a red circle", 0.5),             # precision 1, recall 1/3: 2 * 1/3 / (4/3)
    ("1 1 1", "1 2", 0.4),                    # repeated: one "1" shared; precision 1/3, recall 1/2
    ("1 1", "1 1 2", 0.8),                    # both "1"s shared: precision 1, recall 2/3
    ("", "", 1.0),
    ("", "red", 0.0),
    ("red", "", 0.0),
    (".", "", 1.0),                           # empty after normalisation
])
def test_token_f1(prediction, reference, expected):
    assert token_f1(prediction, reference) == pytest.approx(expected)


@pytest.mark.parametrize("prediction, reference, edits, words", [
    ("1 2 3", "1 2 3.", 0, 3),
    ("1 5 3", "1 2 3", 1, 3),      # one substitution
    ("1 3", "1 2 3", 1, 3),        # one deletion
    ("1 2 9 3", "1 2 3", 1, 3),    # one insertion
    ("2 3 4", "1 2 3", 2, 3),      # a deletion and an insertion beat three substitutions
    ("3 2 1", "1 2 3", 2, 3),      # reversed: the middle word survives
    ("1 1 1 1", "1", 3, 1),        # insertions: the rate can exceed 1
    ("", "1 2", 2, 2),             # nothing predicted: every word deleted
    ("", "", 0, 0),
    ("a b", "", 2, 0),
    ("The Cat", "the cat.", 0, 2),
])
def test_word_edits_and_error_rate(prediction, reference, edits, words):
    assert word_edits(prediction, reference) == (edits, words)
    assert word_error_rate(prediction, reference) == pytest.approx(edits / max(words, 1))


words = st.lists(st.sampled_from("abc"), max_size=7).map(" ".join)


@settings(max_examples=200, deadline=None)
@given(words, words, words)
def test_word_edits_is_a_distance(a, b, c):
    """Levenshtein distance over words: symmetric, zero exactly for equal answers, between the length difference
    and the longer length, and obeying the triangle inequality."""
    ab, ba = word_edits(a, b)[0], word_edits(b, a)[0]
    assert ab == ba
    assert (ab == 0) == (a == b)
    assert abs(len(a.split()) - len(b.split())) <= ab <= max(len(a.split()), len(b.split()))
    assert word_edits(a, c)[0] <= ab + word_edits(b, c)[0]


def _prediction(i, task, modality, prediction, answer, metric=None):
    return Prediction(f"s{i}", task, modality, "q?", answer, prediction, metric)


def test_group_wer_is_the_corpus_rate_of_the_transcriptions_alone():
    group = [
        _prediction(0, "asr", "audio", "1 2", "1 2 3 4", "wer"),   # 2 edits over 4 words
        _prediction(1, "asr", "audio", "5", "6", "wer"),           # 1 edit over 1 word
        _prediction(2, "count", "audio", "7 7 7", "3"),            # not a transcription: no part of WER
    ]
    scores = group_scores(group)
    # corpus rate (2 + 1) / (4 + 1), not the mean of the sample rates (0.5 + 1) / 2
    assert scores["wer"] == pytest.approx(3 / 5) and scores["wer_samples"] == 2
    assert scores["n"] == 3 and scores["exact_match"] == 0.0
    assert scores["token_f1"] == pytest.approx((2 / 3 + 0 + 0) / 3)  # "1 2" vs "1 2 3 4": p 1, r 1/2
    assert "wer" not in group_scores(group[2:]) and "wer_samples" not in group_scores(group[2:])
    with pytest.raises(ValueError, match="no predictions"):
        group_scores([])


def test_report_aggregates_per_task_modality_and_overall():
    predictions = [_prediction(i, *case) for i, case in enumerate([
        ("image_colour", "image", "Red.", "red"),
        ("image_colour", "image", "  blue   green ", "blue green"),
        ("image_colour", "image", "red", "blue"),
        ("image_caption", "image", "A Cross at the TOP left", "a cross at the top left."),
        ("audio_transcribe", "audio", "1 2", "12", "wer"),
        ("audio_transcribe", "audio", "1 2 3..", "1 2 3", "wer"),
    ])]
    assert [p.correct for p in predictions] == [True, True, False, True, False, False]
    report = score_predictions(predictions)
    # "1 2" vs "12": 0 F1, 2 edits over 1 word; "1 2 3." vs "1 2 3": F1 2/3 (p 2/3, r 2/3), 1 edit over 3 words
    transcribe = {"n": 2, "exact_match": 0.0, "token_f1": pytest.approx(1 / 3), "wer": pytest.approx(3 / 4),
                  "wer_samples": 2}
    assert report.per_task == {
        "audio_transcribe": transcribe,
        "image_caption": {"n": 1, "exact_match": 1.0, "token_f1": 1.0},
        "image_colour": {"n": 3, "exact_match": pytest.approx(2 / 3), "token_f1": pytest.approx(2 / 3)},
    }
    assert report.per_modality == {"audio": transcribe,
                                   "image": {"n": 4, "exact_match": 0.75, "token_f1": 0.75}}
    assert report.overall == pytest.approx(3 / 6) and report.num_samples == 6
    assert report.overall_scores["wer"] == pytest.approx(3 / 4)
    table = report.format_table()
    assert "66.7 %" in table and "50.0 %" in table and "75.0 %" in table
    caption_row = next(line for line in table.splitlines() if line.startswith("image_caption"))
    assert caption_row.split()[-1] == "-"  # no transcription in the group: no WER
    out = report.to_dict(checkpoint="c", split="val")
    assert out["per_task"]["image_caption"]["exact_match"] == 1.0 and out["overall"] == pytest.approx(0.5)
    assert out["num_samples"] == 6 and out["overall_scores"]["n"] == 6
    assert [e["id"] for e in out["examples"]] == ["s0", "s1", "s3", "s4", "s5"]  # two per task
