"""OmniCollator: shapes, label masking, metadata, the exact length function, padding, and packing proven
against the tiny omni model (a packed row gives each sample the logits and loss it gets alone)."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from omni_moe.data.collate import OmniCollator, block_causal_mask
from omni_moe.data.quality import SampleRejected
from omni_moe.data.reader import ShardDataset
from omni_moe.data.shards import build_shards
from omni_moe.data.synth import generate
from omni_moe.data.tokenizer import build_bpe_tokenizer
from omni_moe.modeling.modeling_omni import OmniMoeForCausalLM
from omni_moe.modeling.processing_omni import IGNORE_INDEX, OmniMoeProcessor
from omni.demo import SENTENCES, tiny_omni_config


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("collate")
    manifests = generate(root / "synth", seed=1, num=22, splits=("train",))  # every task twice
    build_shards(manifests["train"], root / "synth", root / "shards", max_samples_per_shard=11, progress=False)
    tokenizer = build_bpe_tokenizer(SENTENCES, vocab_size=320)
    config = tiny_omni_config(tokenizer)
    collator = OmniCollator(OmniMoeProcessor.from_config(config, tokenizer))
    samples = list(ShardDataset(root / "shards", rank=0, world_size=1, shuffle=False, transform=collator.measure))
    by_modality = {m: [s for s in samples if s["meta"]["modality"] == m] for m in ("text", "image", "video", "audio")}
    assert all(len(v) >= 2 for v in by_modality.values())
    return config, collator, samples, by_modality


def one_of_each(by_modality, k=0):
    return [by_modality[m][k] for m in ("text", "image", "video", "audio")]


def labelled_text(tokenizer, row_ids, row_labels):
    return tokenizer.decode([t for t, lab in zip(row_ids.tolist(), row_labels.tolist()) if lab != IGNORE_INDEX])


def test_collation_shapes_labels_and_metadata(setup):
    _, collator, _, by_modality = setup
    samples = one_of_each(by_modality)
    batch = collator(samples)
    x = batch.inputs
    b, t = x["input_ids"].shape
    assert b == 4 and x["labels"].shape == x["modality_ids"].shape == x["attention_mask"].shape == (b, t)
    assert x["position_ids"].shape == (3, b, t)
    assert x["pixel_values"].shape == (1, 3, 32, 32) and x["pixel_values_videos"].shape[:2] == (1, 4)
    assert x["audio_features"].shape[0] == int(x["audio_chunk_counts"].sum()) == 1
    lengths = x["attention_mask"].sum(1)
    assert lengths.tolist() == [s["num_tokens"] for s in samples]
    tokenizer = collator.processor.tokenizer
    for row, sample in enumerate(samples):
        labels, ids = x["labels"][row], x["input_ids"][row]
        assert (labels[lengths[row]:] == IGNORE_INDEX).all(), "padding carries no label"
        assert (labels[x["modality_ids"][row] != 0] == IGNORE_INDEX).all(), "media tokens are never targets"
        answer = sample["messages"][-1]["content"]
        assert labelled_text(tokenizer, ids, labels) == answer + "<|im_end|>", "only the assistant turn is labelled"
    assert batch.sample_ids == [s["id"] for s in samples]
    assert batch.num_tokens == int(lengths.sum()) and batch.num_padded_tokens == b * t
    assert batch.num_label_tokens == int((x["labels"][:, 1:] != IGNORE_INDEX).sum()) > 4
    assert batch.modality_samples == {"text": 1, "image": 1, "video": 1, "audio": 1}
    media_tokens = {name: int((x["modality_ids"] == i).sum()) for i, name in enumerate(collator.modalities)}
    assert batch.modality_tokens == {**media_tokens, "text": batch.num_tokens - sum(
        n for k, n in media_tokens.items() if k != "text")}
    assert not batch.packed and batch.to("cpu").inputs["input_ids"].equal(x["input_ids"])


def test_sequence_length_is_exact_for_every_modality_and_awkward_text(setup):
    _, collator, samples, by_modality = setup
    image = by_modality["image"][0]["images"][0]
    noise = np.random.default_rng(0).standard_normal(41_000).astype(np.float32) * 0.1  # 2.6 s: three chunks
    awkward = [
        {"id": "long-audio", "messages": [{"role": "user", "content": "<audio>\nHi <|im_start|> <image>x"},
                                          {"role": "assistant", "content": "ok"}],
         "images": [image], "videos": [], "audios": [noise], "meta": {"modality": "audio"}},
        {"id": "multi-turn", "messages": [
            {"role": "system", "content": "be brief"}, {"role": "user", "content": "a<video>b"},
            {"role": "assistant", "content": "c"}, {"role": "user", "content": "again <audio>"},
            {"role": "assistant", "content": " d  "}],
         "images": [], "videos": [[image] * 3], "video_fps": [None], "audios": [np.zeros(160, np.float32)],
         "meta": {"modality": "video"}},
    ]
    for sample in [*samples, *awkward]:
        processed = collator._process([sample])
        assert collator.sequence_length(sample) == int(processed["attention_mask"].sum()), sample["id"]


def test_measure_rejects_over_long_samples_and_collate_refuses_them(setup):
    _, collator, _, by_modality = setup
    video = by_modality["video"][0]
    short = OmniCollator(collator.processor, max_length=video["num_tokens"] - 1)
    with pytest.raises(SampleRejected, match=r"too_long: \d+ tokens after processing > max_length"):
        short.measure(video)
    assert short.measure(by_modality["text"][0])["num_tokens"] == by_modality["text"][0]["num_tokens"]
    with pytest.raises(ValueError, match=f"sample '{video['id']}' has {video['num_tokens']} tokens > max_length"):
        short([video])


def test_a_sample_without_any_label_is_refused_by_name(setup):
    _, collator, _, by_modality = setup
    text = by_modality["text"][0]
    unlabelled = {k: v for k, v in text.items() if k != "num_tokens"}
    unlabelled.update(id="no-answer", messages=text["messages"][:1])
    with pytest.raises(ValueError, match="sample 'no-answer': no token carries a label"):
        collator([text, unlabelled])
    stale = {**text, "num_tokens": text["num_tokens"] + 1}
    with pytest.raises(ValueError, match="out of step with the processor"):
        collator([stale])


def test_pad_to_multiple_of(setup):
    _, collator, _, by_modality = setup
    samples = one_of_each(by_modality, 1)
    plain = collator(samples).inputs
    padded = OmniCollator(collator.processor, pad_to_multiple_of=16)(samples).inputs
    t, t16 = plain["input_ids"].shape[1], padded["input_ids"].shape[1]
    assert t16 % 16 == 0 and t <= t16 < t + 16
    for name in ("input_ids", "attention_mask", "modality_ids", "labels"):
        assert padded[name][:, :t].equal(plain[name])
    assert (padded["attention_mask"][:, t:] == 0).all() and (padded["labels"][:, t:] == IGNORE_INDEX).all()
    assert padded["position_ids"][:, :, :t].equal(plain["position_ids"])
    assert (padded["position_ids"].diff(dim=2)[:, :, t - 1:] == 1).all()


def test_block_causal_mask():
    segments = torch.tensor([[1, 1, 2, 2, 2, 0]])
    mask = block_causal_mask(segments)[0, 0]
    expected = torch.tensor([[1, 0, 0, 0, 0, 0], [1, 1, 0, 0, 0, 0], [0, 0, 1, 0, 0, 0], [0, 0, 1, 1, 0, 0],
                             [0, 0, 1, 1, 1, 0], [0, 0, 0, 0, 0, 1]], dtype=torch.bool)
    assert mask.equal(expected)


def per_sample_losses(logits, labels):
    """Summed next-token cross-entropy and target count of one sequence."""
    return F.cross_entropy(logits[:-1].float(), labels[1:], ignore_index=IGNORE_INDEX, reduction="sum")


def test_packed_rows_give_each_sample_its_unpacked_logits_and_loss(setup):
    config, collator, _, by_modality = setup
    torch.manual_seed(0)
    model = OmniMoeForCausalLM(config).eval()
    rows = [[by_modality["image"][0], by_modality["text"][0], by_modality["audio"][0]],
            [by_modality["video"][0], by_modality["image"][1]], [by_modality["text"][1]]]
    packed = collator(rows)
    x = packed.inputs
    assert packed.packed and x["attention_mask"].shape == (3, 1, x["input_ids"].shape[1], x["input_ids"].shape[1])
    samples = [s for row in rows for s in row]
    unpadded = collator(samples)
    assert packed.num_tokens == unpadded.num_tokens and packed.num_label_tokens == unpadded.num_label_tokens
    assert packed.sample_ids == unpadded.sample_ids and packed.num_padded_tokens < unpadded.num_padded_tokens
    with torch.no_grad():
        out = model(**x)
        batched = model(**unpadded.inputs)
        for r, row in enumerate(rows):
            start = 0
            for k, sample in enumerate(row):
                n = sample["num_tokens"]
                span = slice(start, start + n)
                assert (packed.segment_ids[r, span] == k + 1).all()
                assert x["position_ids"][:, r, start].tolist() == [0, 0, 0], "positions restart per sample"
                assert x["labels"][r, start] == IGNORE_INDEX, "no target crosses into the next sample"
                alone = collator([sample]).inputs
                reference = model(**alone).logits[0]
                assert torch.allclose(out.logits[r, span], reference, atol=1e-5, rtol=0), sample["id"]
                assert torch.allclose(per_sample_losses(out.logits[r, span], x["labels"][r, span]),
                                      per_sample_losses(reference, alone["labels"][0]), atol=1e-5, rtol=1e-6)
                start += n
        assert torch.allclose(out.ce_loss, batched.ce_loss, atol=1e-5)
    assert not torch.isnan(out.logits).any()  # padding rows see themselves: no NaN anywhere


def test_packed_rows_backpropagate_like_separate_samples(setup):
    """Gradients through the packed layout equal the unpacked batch's (the loss is the same mean)."""
    config, collator, _, by_modality = setup
    torch.manual_seed(1)
    model = OmniMoeForCausalLM(config)
    rows = [[by_modality["text"][0], by_modality["image"][0]], [by_modality["audio"][1]]]
    grads = []
    for batch in (collator(rows), collator([s for row in rows for s in row])):
        model.zero_grad()
        model(**batch.inputs).ce_loss.backward()  # not the aux losses: those count padding tokens
        grads.append(model.lm_head.weight.grad.clone())
    assert torch.allclose(grads[0], grads[1], atol=1e-6)


def assert_same_batch(a, b):
    assert a.inputs.keys() == b.inputs.keys() and all(a.inputs[k].equal(b.inputs[k]) for k in a.inputs)
    assert (a.sample_ids, a.num_tokens, a.num_label_tokens, a.modality_tokens) == \
        (b.sample_ids, b.num_tokens, b.num_label_tokens, b.modality_tokens)
    assert (a.segment_ids is None and b.segment_ids is None) or a.segment_ids.equal(b.segment_ids)


def test_batches_cross_process_boundaries_intact(setup):
    """Workers hand batches over by pickling (small tensors inline, large ones through shared memory)."""
    import pickle
    from multiprocessing.reduction import ForkingPickler

    from omni_moe.data.collate import INLINE_TENSOR_BYTES

    _, collator, _, by_modality = setup
    packed = collator([[by_modality["video"][0], by_modality["text"][0]], [by_modality["audio"][0]]])
    big = collator(one_of_each(by_modality))
    big.inputs["pixel_values"] = torch.randn(INLINE_TENSOR_BYTES // 4 + 1)  # over the inline limit
    for batch in (packed, big):
        assert_same_batch(pickle.loads(pickle.dumps(batch)), batch)
        assert_same_batch(ForkingPickler.loads(bytes(ForkingPickler.dumps(batch))), batch)


def test_loader_workers_deliver_what_the_main_process_collates(setup):
    """Packed batches made in 2 real worker processes equal collating the same rows here."""
    from omni_moe.data.batching import make_batching
    from omni_moe.data.loader import ResumableLoader

    _, collator, samples, _ = setup
    by_id = {s["id"]: s for s in samples}
    dataset = ShardDataset(sorted({s["shard"] for s in samples}), rank=0, world_size=1, transform=collator.measure)
    strategy = make_batching("token_budget", packing=True, max_length=256, max_tokens=512, lookahead=8)
    batches = list(ResumableLoader(dataset, batching=strategy, collate_fn=collator, num_workers=2))
    assert sorted(i for b in batches for i in b.sample_ids) == sorted(by_id)
    for batch in batches:
        per_row = batch.segment_ids.max(dim=1).values.tolist()
        ids = iter(batch.sample_ids)
        rows = [[by_id[next(ids)] for _ in range(n)] for n in per_row]
        assert_same_batch(batch, collator(rows))
