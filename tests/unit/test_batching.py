"""Batching strategies: their invariants, exact resume with 0 and 2 real workers, determinism, and the
exact-length filter. Samples come from the synthetic dataset through real shards and the real reader."""

import json
import random

import pytest

from omni_moe.data.batching import (
    ModalityGroupedBatching,
    PackedBatching,
    TokenBudgetBatching,
    iter_batches,
    make_batching,
)
from omni_moe.data.collate import OmniCollator
from omni_moe.data.loader import ResumableLoader
from omni_moe.data.quality import DropPolicy
from omni_moe.data.reader import ShardDataset, Tagged
from omni_moe.data.shards import build_shards
from omni_moe.data.synth import generate
from omni_moe.data.tokenizer import build_bpe_tokenizer
from omni_moe.modeling.processing_omni import OmniMoeProcessor
from omni.demo import SENTENCES, tiny_omni_config

NUM_SAMPLES = 64  # 8 shards of 8: splits evenly over 2 workers


@pytest.fixture(scope="module")
def collator():
    tokenizer = build_bpe_tokenizer(SENTENCES, vocab_size=320)
    return OmniCollator(OmniMoeProcessor.from_config(tiny_omni_config(tokenizer), tokenizer))


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("batching")
    manifests = generate(root / "synth", seed=3, num=NUM_SAMPLES, splits=("train",))
    build_shards(manifests["train"], root / "synth", root / "shards", max_samples_per_shard=8, progress=False)
    return root / "shards"


def make_loader(shards, collator, batching, num_workers=0, seed=7, **kw):
    dataset = ShardDataset(shards, rank=0, world_size=1, seed=seed, shuffle_buffer=8, transform=collator.measure,
                           policy=kw.pop("policy", None))
    return ResumableLoader(dataset, batching=batching, num_workers=num_workers, **kw)


def flat(batch):
    """Samples of a batch; a packed batch is a list of rows."""
    return [s for row in batch for s in row] if batch and isinstance(batch[0], list) else list(batch)


def ids(batch):
    return [[s["id"] for s in row] for row in batch] if isinstance(batch[0], list) else [s["id"] for s in batch]


def epoch_ids(loader):
    return [ids(batch) for batch in loader]


STRATEGIES = {
    "mixed": lambda: make_batching("mixed", batch_size=5),
    "modality_grouped": lambda: make_batching("modality_grouped", batch_size=4, lookahead=12),
    "token_budget": lambda: make_batching("token_budget", max_tokens=500, lookahead=12),
    "packed": lambda: make_batching("token_budget", packing=True, max_length=256, max_tokens=512, lookahead=12),
}


# ---------------------------------------------------------------------------------------------- invariants
def test_modality_grouped_batches_hold_one_modality_and_one_length_bucket(shards, collator):
    strategy = ModalityGroupedBatching(batch_size=4, lookahead=16, bucket_boundaries=(48, 80, 128))
    batches = list(make_loader(shards, collator, strategy))
    seen = [s["id"] for batch in batches for s in batch]
    assert sorted(seen) == sorted(set(seen)) and len(seen) == NUM_SAMPLES
    for batch in batches:
        assert len({s["meta"]["modality"] for s in batch}) == 1, ids(batch)
        assert len({strategy.bucket(s["num_tokens"]) for s in batch}) == 1, [s["num_tokens"] for s in batch]
        assert 1 <= len(batch) <= 4
    full = sum(len(b) == 4 for b in batches)
    assert full >= len(batches) // 2, f"grouping should mostly fill batches: {[len(b) for b in batches]}"


def test_token_budget_is_never_exceeded_and_an_over_budget_sample_goes_alone(shards, collator):
    lengths = sorted(s["num_tokens"] for s in ShardDataset(shards, rank=0, world_size=1, transform=collator.measure))
    budget = lengths[-3]  # the longest samples fit alone at most: some are over budget
    over = [n for n in lengths if n > budget]
    assert over, "the test needs an over-budget sample"
    batches = list(make_loader(shards, collator, TokenBudgetBatching(max_tokens=budget, lookahead=16)))
    assert sorted(s["num_tokens"] for b in batches for s in b) == lengths
    for batch in batches:
        padded = len(batch) * max(s["num_tokens"] for s in batch)
        assert padded <= budget or len(batch) == 1, [s["num_tokens"] for s in batch]
    alone = [b[0]["num_tokens"] for b in batches if len(b) == 1 and b[0]["num_tokens"] > budget]
    assert sorted(alone) == over
    assert max(len(b) for b in batches) > 1


def test_packed_rows_fit_max_length_and_cover_every_sample_once(shards, collator):
    strategy = PackedBatching(max_length=200, rows_per_batch=3, lookahead=16)
    batches = list(make_loader(shards, collator, strategy))
    rows = [row for batch in batches for row in batch]
    assert all(sum(s["num_tokens"] for s in row) <= 200 for row in rows)
    assert all(len(batch) <= 3 for batch in batches) and sum(len(b) == 3 for b in batches) >= len(batches) - 1
    seen = [s["id"] for row in rows for s in row]
    assert len(seen) == NUM_SAMPLES == len(set(seen))
    fill = sum(s["num_tokens"] for row in rows for s in row) / (200 * len(rows))
    assert fill > 0.75, f"first-fit decreasing should fill rows well, got {fill:.2f}"


@pytest.mark.parametrize("seed", range(5))
def test_strategies_on_random_lengths_keep_every_sample_and_their_limits(seed):
    """Pure strategy check (no IO): random lengths/modalities through iter_batches, every strategy."""
    rng = random.Random(seed)
    items = [{"id": f"s{i}", "num_tokens": rng.randint(1, 120), "meta": {"modality": rng.choice("ab")}}
             for i in range(rng.randint(1, 90))]
    stream = [Tagged(item, 0, i + 1, {}) for i, item in enumerate(items)]
    for strategy in (TokenBudgetBatching(240, lookahead=rng.randint(1, 20), max_batch_size=6),
                     ModalityGroupedBatching(3, lookahead=rng.randint(3, 20), bucket_boundaries=(30, 60)),
                     PackedBatching(150, rows_per_batch=2, lookahead=rng.randint(1, 20))):
        out = [e.items for e in iter_batches(iter(stream), strategy) if e.items is not None]
        got = [s["id"] for batch in out for s in flat(batch)]
        assert sorted(got) == sorted(item["id"] for item in items), strategy.name
        for batch in out:
            if strategy.name == "token_budget":
                assert len(batch) <= 6 and len(batch) * max(s["num_tokens"] for s in batch) <= 240
            elif strategy.name == "packed":
                assert all(sum(s["num_tokens"] for s in row) <= 150 for row in batch) and len(batch) <= 2


def test_lookahead_bounds_the_buffer(shards, collator):
    """What a resume re-reads is bounded: never more than lookahead samples pending."""
    tagged = ShardDataset(shards, rank=0, world_size=1, transform=collator.measure).iter_tagged()
    emissions = list(iter_batches(tagged, ModalityGroupedBatching(4, lookahead=10)))
    assert max(len(e.pending) for e in emissions) < 10
    assert any(e.pending for e in emissions), "the grouped strategy should hold samples back sometimes"


# ---------------------------------------------------------------------------------------------- resume
@pytest.mark.parametrize("num_workers", [0, 2])
@pytest.mark.parametrize("name", sorted(STRATEGIES))
def test_resume_gives_the_batches_of_the_uninterrupted_run(shards, collator, name, num_workers):
    straight = make_loader(shards, collator, STRATEGIES[name](), num_workers)
    epoch0, epoch1 = epoch_ids(straight), epoch_ids(straight)
    assert epoch0 != epoch1
    total = straight.counters
    stops = (1, len(epoch0) // 2 + 1, len(epoch0) - 1)
    for stop in stops:
        first, taken = make_loader(shards, collator, STRATEGIES[name](), num_workers), []
        for batch in first:
            taken.append(ids(batch))
            if len(taken) == stop:
                break
        state = json.loads(json.dumps(first.state_dict()))  # must survive a JSON round trip
        resumed = make_loader(shards, collator, STRATEGIES[name](), num_workers)
        resumed.load_state_dict(state)
        for batch in resumed:  # one batch, then save again: a position saved after a replay is exact too
            taken.append(ids(batch))
            break
        again = make_loader(shards, collator, STRATEGIES[name](), num_workers)
        again.load_state_dict(json.loads(json.dumps(resumed.state_dict())))
        assert taken + epoch_ids(again) == epoch0, f"stop={stop}"
        assert epoch_ids(again) == epoch1
        assert again.counters == total


def test_buffered_positions_are_saved_and_replayed(shards, collator):
    strategy = make_batching("modality_grouped", batch_size=4, lookahead=12)
    first = make_loader(shards, collator, strategy)
    iterator = iter(first)
    next(iterator)
    state = first.state_dict()
    assert state["pending"]["0"], "a grouped batch leaves other samples buffered"
    assert all(p <= state["offsets"]["0"] for p in state["pending"]["0"])
    rest = [ids(b) for b in iterator]
    resumed = make_loader(shards, collator, make_batching("modality_grouped", batch_size=4, lookahead=12))
    resumed.load_state_dict(state)
    assert epoch_ids(resumed) == rest


def test_changing_the_strategy_across_a_resume_is_an_error(shards, collator):
    first = make_loader(shards, collator, make_batching("token_budget", max_tokens=500))
    next(iter(first))
    other = make_loader(shards, collator, make_batching("token_budget", max_tokens=600))
    with pytest.raises(ValueError, match="batching: saved .*'max_tokens': 500.* != now .*'max_tokens': 600"):
        other.load_state_dict(first.state_dict())


# ---------------------------------------------------------------------------------------------- determinism
@pytest.mark.parametrize("name", ["modality_grouped", "token_budget", "packed"])
def test_batches_are_a_function_of_seed_and_epoch(shards, collator, name):
    def run(seed, epoch):
        loader = make_loader(shards, collator, STRATEGIES[name](), seed=seed)
        loader.set_epoch(epoch)
        return epoch_ids(loader)

    assert run(1, 0) == run(1, 0)
    assert run(1, 1) == run(1, 1)
    assert run(1, 0) != run(1, 1) and run(1, 0) != run(2, 0)


# ---------------------------------------------------------------------------------------------- over-long samples
def test_over_long_samples_are_dropped_at_read_time_under_too_long(shards, collator):
    lengths = sorted(s["num_tokens"] for s in ShardDataset(shards, rank=0, world_size=1, transform=collator.measure))
    limit = lengths[len(lengths) * 3 // 4]
    strict = OmniCollator(collator.processor, max_length=limit)
    dataset = ShardDataset(shards, rank=0, world_size=1, transform=strict.measure,
                           policy=DropPolicy(max_drop_rate=None))
    loader = ResumableLoader(dataset, batching=make_batching("token_budget", max_tokens=4 * limit), num_workers=2)
    kept = [s for batch in loader for s in batch]
    too_long = sum(n > limit for n in lengths)
    assert too_long > 0 and loader.counters.dropped == {"too_long": too_long}
    assert len(kept) == NUM_SAMPLES - too_long and all(s["num_tokens"] <= limit for s in kept)
    strict_policy = ShardDataset(shards, rank=0, world_size=1, transform=strict.measure,
                                 policy=DropPolicy(strict=True))
    with pytest.raises(Exception, match="too_long: .* tokens after processing > max_length"):
        list(strict_policy)


def test_make_batching_rejects_bad_settings():
    with pytest.raises(ValueError, match="unknown batching strategy 'sorted'"):
        make_batching("sorted", batch_size=2)
    with pytest.raises(ValueError, match="packing needs max_length"):
        make_batching("mixed", batch_size=2, packing=True)
    with pytest.raises(ValueError, match="not combined with modality_grouped"):
        make_batching("modality_grouped", batch_size=2, packing=True, max_length=64)
    with pytest.raises(ValueError, match="lookahead .* must be >= batch_size"):
        make_batching("modality_grouped", batch_size=8, lookahead=4)
    with pytest.raises(ValueError, match="exactly one of batch_size .* or batching"):
        ResumableLoader(None, batch_size=2, batching=make_batching("mixed", batch_size=2))
    with pytest.raises(ValueError, match="has 300 tokens > packing max_length 256"):
        list(iter_batches([Tagged({"id": "x", "num_tokens": 300}, 0, 1, {})], PackedBatching(256, 2)))
