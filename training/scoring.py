"""Scoring a model's answers against the reference answers of any canonical manifest.

Every answer is compared after `normalize_answer` (lower case, whitespace collapsed, one trailing period dropped)
and gets two scores:

* exact match: the normalised strings are equal;
* token F1 (SQuAD-style): the harmonic mean of precision and recall of the bag of whitespace tokens the prediction
  shares with the reference. Unlike SQuAD's normalisation, articles and punctuation are kept: in short answers such
  as "a red circle at the top left" every word is part of what is asked.

A sample whose `meta.metric` is "wer" (`omni_moe.data.schema.ANSWER_METRICS`) is a transcription: its word error rate (word-
level Levenshtein distance: substitutions + deletions + insertions, over the reference's word count) is reported
too. A group's WER is the corpus rate over its transcription samples (total edits / total reference words), so a
group mixing transcriptions with other tasks reports WER of the transcriptions alone (`wer_samples` of them).

`score_predictions` groups predictions by modality and by task into an `EvalReport` (table, JSON: the eval.json
`omni export`'s model card reads).
"""

from __future__ import annotations

from collections import Counter, defaultdict
from dataclasses import dataclass, field

from omni_moe.data.schema import WER_METRIC
EXAMPLES_PER_TASK = 2


# ----------------------------------------------------------------------------- per answer
def normalize_answer(text: str) -> str:
    """Lower-case, strip, collapse whitespace and drop one trailing period."""
    text = " ".join(text.split()).lower()
    if text.endswith("."):
        text = text[:-1].rstrip()
    return text


def exact_match(prediction: str, reference: str) -> bool:
    """The answers are equal after `normalize_answer` on both sides."""
    return normalize_answer(prediction) == normalize_answer(reference)


def token_f1(prediction: str, reference: str) -> float:
    """Bag-of-tokens F1 after `normalize_answer`: a repeated token counts as often as both sides hold it. Two empty
    answers agree (1.0); an empty answer against a non-empty one shares nothing (0.0)."""
    predicted, expected = normalize_answer(prediction).split(), normalize_answer(reference).split()
    if not predicted or not expected:
        return float(predicted == expected)
    shared = sum((Counter(predicted) & Counter(expected)).values())
    if shared == 0:
        return 0.0
    precision, recall = shared / len(predicted), shared / len(expected)
    return 2 * precision * recall / (precision + recall)


def word_edits(prediction: str, reference: str) -> tuple[int, int]:
    """(word-level Levenshtein distance, reference word count) after `normalize_answer`: the fewest substitutions,
    deletions and insertions of words turning the reference into the prediction."""
    predicted, expected = normalize_answer(prediction).split(), normalize_answer(reference).split()
    previous = list(range(len(predicted) + 1))  # distances from the empty reference prefix
    for i, word in enumerate(expected, start=1):
        current = [i]
        for j, guess in enumerate(predicted, start=1):
            current.append(min(previous[j] + 1,                        # reference word deleted
                               current[j - 1] + 1,                     # predicted word inserted
                               previous[j - 1] + (word != guess)))     # kept or substituted
        previous = current
    return previous[-1], len(expected)


def word_error_rate(prediction: str, reference: str) -> float:
    """`word_edits` as a rate: edits / reference words. An empty reference has no words to divide by: the rate is
    0.0 for an empty prediction, else the number of inserted words (as if over one reference word)."""
    edits, words = word_edits(prediction, reference)
    return edits / max(words, 1)


# ----------------------------------------------------------------------------- per group
@dataclass
class Prediction:
    """One sample's answer; `metric` is the sample's `meta.metric` (None when it names none)."""

    sample_id: str
    task: str
    modality: str
    question: str
    answer: str
    prediction: str
    metric: str | None = None

    @property
    def correct(self) -> bool:
        return exact_match(self.prediction, self.answer)

    @property
    def token_f1(self) -> float:
        return token_f1(self.prediction, self.answer)

    @property
    def is_transcription(self) -> bool:
        return self.metric == WER_METRIC


def group_scores(predictions: list[Prediction]) -> dict:
    """{"n", "exact_match", "token_f1"} (means over the group), plus {"wer", "wer_samples"} when any prediction is a
    transcription: the corpus word error rate of those."""
    if not predictions:
        raise ValueError("no predictions to score")
    n = len(predictions)
    scores = {"n": n, "exact_match": sum(p.correct for p in predictions) / n,
              "token_f1": sum(p.token_f1 for p in predictions) / n}
    transcriptions = [p for p in predictions if p.is_transcription]
    if transcriptions:
        edits, words = map(sum, zip(*(word_edits(p.prediction, p.answer) for p in transcriptions)))
        scores |= {"wer": edits / max(words, 1), "wer_samples": len(transcriptions)}
    return scores


def _grouped(predictions: list[Prediction], key) -> dict[str, dict]:
    groups: dict[str, list[Prediction]] = defaultdict(list)
    for p in predictions:
        groups[key(p)].append(p)
    return {name: group_scores(group) for name, group in sorted(groups.items())}


@dataclass
class EvalReport:
    """Scores (`group_scores`) per modality, per task and over all samples, plus every prediction; `overall` is the
    exact match over all samples (micro average), the headline number."""

    per_modality: dict[str, dict]
    per_task: dict[str, dict]
    overall_scores: dict
    predictions: list[Prediction]
    routing: dict | None = None
    examples: list[dict] = field(default_factory=list)

    @property
    def overall(self) -> float:
        return self.overall_scores["exact_match"]

    @property
    def num_samples(self) -> int:
        return self.overall_scores["n"]

    def to_dict(self, checkpoint: str | None = None, split: str | None = None) -> dict:
        out = {"per_modality": self.per_modality, "per_task": self.per_task, "overall": self.overall,
               "overall_scores": self.overall_scores, "num_samples": self.num_samples, "checkpoint": checkpoint,
               "split": split, "examples": self.examples}
        if self.routing is not None:
            out["routing"] = self.routing
        return out

    def format_table(self) -> str:
        def row(name: str, r: dict) -> str:
            wer = f"{100 * r['wer']:>8.1f} %" if "wer" in r else f"{'-':>10}"
            return f"{name:<20} {r['n']:>6} {100 * r['exact_match']:>10.1f} % {100 * r['token_f1']:>8.1f} % {wer}"

        def header(label: str) -> str:
            return f"{label:<20} {'n':>6} {'exact match':>12} {'token F1':>10} {'WER':>10}"

        lines = [header("modality"), *(row(m, r) for m, r in self.per_modality.items())]
        lines += ["", header("task"), *(row(t, r) for t, r in self.per_task.items())]
        lines += ["", row("overall", self.overall_scores)]
        if self.routing is not None:
            lines += ["", *_routing_lines(self.routing)]
        return "\n".join(lines)


def _routing_lines(routing: dict) -> list[str]:
    lines = [f"routing: share of routed probability mass, mean over {routing['num_moe_layers']} MoE layers "
             f"(per token modality)",
             f"{'modality':<10} {'tokens':>8} {'intra':>7} {'inter':>7} {'other':>7} {'null':>7} "
             f"{'intra+inter':>12} {'uniform intra':>14}"]
    for m, r in routing["per_modality"].items():
        lines.append(f"{m:<10} {r['tokens']:>8} {r['intra']:>7.3f} {r['inter']:>7.3f} {r['other_pools']:>7.3f} "
                     f"{r['null']:>7.3f} {r['intra_plus_inter']:>12.3f} {r['uniform_intra_share']:>14.3f}")
    return lines


def score_predictions(predictions: list[Prediction]) -> EvalReport:
    """Scores per modality, per task and overall, and the first EXAMPLES_PER_TASK predictions of each task."""
    if not predictions:
        raise ValueError("no predictions to score")
    examples, shown = [], defaultdict(int)
    for p in predictions:
        if shown[p.task] < EXAMPLES_PER_TASK:
            shown[p.task] += 1
            examples.append({"id": p.sample_id, "task": p.task, "modality": p.modality, "question": p.question,
                             "answer": p.answer, "prediction": p.prediction, "correct": p.correct,
                             "token_f1": p.token_f1})
    return EvalReport(per_modality=_grouped(predictions, lambda p: p.modality),
                      per_task=_grouped(predictions, lambda p: p.task),
                      overall_scores=group_scores(predictions), predictions=predictions, examples=examples)


__all__ = [
    "EvalReport", "Prediction", "WER_METRIC", "exact_match", "group_scores", "normalize_answer", "score_predictions",
    "token_f1", "word_edits", "word_error_rate",
]
