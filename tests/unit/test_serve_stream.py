"""How `omni serve` turns generated tokens into streamed text (`omni.serve_engine._Row`), with the real byte-level BPE
tokenizer: stop strings that span tokens are never half-streamed, an incomplete UTF-8 character is held back until
it completes, and the streamed pieces always add up to the final answer."""

from __future__ import annotations

import pytest

from omni_moe.data.tokenizer import build_bpe_tokenizer
from omni.serve_engine import Job, _Row
from omni.serve_inputs import Prompt
from tests.tiny import TINY_TEXTS


@pytest.fixture(scope="module")
def tokenizer():
    return build_bpe_tokenizer(TINY_TEXTS, vocab_size=300)


def feed(tokenizer, text: str, **job_fields):
    """Step a row through the tokens of `text` (then the end-of-turn id); returns (deltas, done payload, tokens fed)."""
    events = []
    job = Job(Prompt(conversation=[]), prompt_tokens=7, **{"max_tokens": 100, **job_fields})
    row = _Row(job, lambda kind, payload: events.append((kind, payload)), tokenizer, {tokenizer.eos_token_id})
    ids = tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    fed = 0
    for token in ids:
        if row.done:
            break
        row.step(token)
        fed += 1
    deltas = [p for k, p in events if k == "delta"]
    done = [p for k, p in events if k == "done"]
    assert len(done) == 1 and events[-1][0] == "done"
    return deltas, done[0], fed


def test_plain_answer_streams_in_pieces_and_ends_at_the_end_of_turn(tokenizer):
    deltas, done, fed = feed(tokenizer, "a red circle at the top left")
    assert "".join(deltas) == "a red circle at the top left" and len(deltas) > 3
    assert done == {"finish_reason": "stop", "prompt_tokens": 7, "completion_tokens": fed}


def test_a_stop_string_spanning_tokens_is_never_streamed(tokenizer):
    deltas, done, fed = feed(tokenizer, "left right up down", stop=["ght u", "zzz"])
    assert "".join(deltas) == "left ri"
    assert not any("g" in d for d in deltas)  # nothing of the stop string leaked out before it was recognised
    assert done["finish_reason"] == "stop"
    assert fed < len(tokenizer("left right up down", add_special_tokens=False)["input_ids"])  # stopped early


def test_max_tokens_ends_with_length(tokenizer):
    deltas, done, fed = feed(tokenizer, "blue green cyan blue green cyan", max_tokens=3)
    assert (done["finish_reason"], done["completion_tokens"], fed) == ("length", 3, 3)
    ids = tokenizer("blue green cyan blue green cyan", add_special_tokens=False)["input_ids"][:3]
    assert "".join(deltas) == tokenizer.decode(ids)


def test_incomplete_utf8_is_held_back(tokenizer):
    text = "größe 1 2 3 ü"  # multi-byte characters the tiny BPE splits into byte tokens
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert any("\ufffd" in tokenizer.decode(ids[:i]) for i in range(1, len(ids)))  # a split character exists
    deltas, done, _ = feed(tokenizer, text)
    assert "".join(deltas) == text
    assert not any("\ufffd" in d for d in deltas)


def test_a_cancelled_row_goes_quiet(tokenizer):
    events = []
    job = Job(Prompt(conversation=[]), prompt_tokens=1, max_tokens=50)
    row = _Row(job, lambda kind, payload: events.append(kind), tokenizer, {tokenizer.eos_token_id})
    ids = tokenizer("left right up down", add_special_tokens=False)["input_ids"]
    row.step(ids[0])
    job.cancelled.set()
    for token in ids[1:]:
        row.step(token)
    assert row.done and "done" not in events and len(row.tokens) == 1
