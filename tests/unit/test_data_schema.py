"""Canonical sample schema, importers, manifest parsing and the drop policy (no media, no shards)."""

import copy
import json

import pytest
from tokenizers import Tokenizer
from tokenizers.models import WordLevel
from tokenizers.pre_tokenizers import WhitespaceSplit

from omni_moe.data import quality
from omni_moe.data.importers import llava_to_canonical, read_manifest, to_canonical
from omni_moe.data.quality import BadSampleError, DropCounters, DropPolicy, DropRateExceeded, SampleRejected
from omni_moe.data.schema import (
    check_length,
    make_token_length_fn,
    primary_modality,
    to_processor_messages,
    validate_sample,
)

VALID = {
    "id": "train-image-000017",
    "messages": [
        {"role": "system", "content": "optional"},
        {"role": "user", "content": "<image>\nWhat colour is the shape?"},
        {"role": "assistant", "content": "red"},
    ],
    "images": ["images/train/000017.png"],
    "videos": [["videos/3/f0.png", "videos/3/f1.png"]],
    "video_fps": [2.0],
    "audios": [],
    "meta": {"task": "image_colour"},
}
VALID["messages"][1]["content"] += " <video>"


def mutated(**changes):
    sample = copy.deepcopy(VALID)
    for key, value in changes.items():
        if value is DELETE:
            del sample[key]
        else:
            sample[key] = value
    return sample


DELETE = object()
USER, ASSISTANT = {"role": "user", "content": "<image> <video>"}, {"role": "assistant", "content": "red"}

BAD_CASES = {
    "not an object": ([1, 2], quality.BAD_SCHEMA, "must be a JSON object, got list"),
    "missing id": (mutated(id=DELETE), quality.BAD_SCHEMA, "'id' must be a non-empty string, got None"),
    "no messages": (mutated(messages=[]), quality.BAD_SCHEMA, "'messages' must be a non-empty list"),
    "unknown role": (mutated(messages=[USER, {"role": "bot", "content": "x"}]), quality.BAD_SCHEMA,
                     "messages[1].role 'bot' is not one of"),
    "content not str": (mutated(messages=[{"role": "user", "content": ["x"]}, ASSISTANT]), quality.BAD_SCHEMA,
                        "messages[0].content must be a string, got list"),
    "assistant first": (mutated(messages=[ASSISTANT, USER]), quality.BAD_ROLE_ORDER,
                        "messages[0] has role 'assistant': expected 'user'"),
    "two users": (mutated(messages=[USER, USER, ASSISTANT]), quality.BAD_ROLE_ORDER,
                  "messages[1] has role 'user': expected 'assistant'"),
    "system later": (mutated(messages=[USER, ASSISTANT, {"role": "system", "content": "s"}]),
                     quality.BAD_ROLE_ORDER, "a system message is only allowed first"),
    "ends with user": (mutated(messages=[USER, ASSISTANT, {"role": "user", "content": "more?"}]),
                       quality.BAD_ROLE_ORDER, "ends with 'user'"),
    "only system": (mutated(messages=[{"role": "system", "content": "s"}]), quality.BAD_ROLE_ORDER,
                    "no user/assistant turns"),
    "empty assistant": (mutated(messages=[USER, {"role": "assistant", "content": " \n"}]),
                        quality.EMPTY_ASSISTANT, "messages[1] (assistant) is empty"),
    "extra image marker": (mutated(messages=[{"role": "user", "content": "<image><image><video>"}, ASSISTANT]),
                           quality.MARKER_MISMATCH, "2 <image> marker(s) in the messages but 1 entry in 'images'"),
    "audio without marker": (mutated(audios=["a.wav"]), quality.MARKER_MISMATCH,
                             "0 <audio> marker(s) in the messages but 1 entry in 'audios'"),
    "zero-frame video": (mutated(videos=[[]]), quality.EMPTY_VIDEO, "videos[0] has 0 frames"),
    "video_fps length": (mutated(video_fps=[1.0, 2.0]), quality.BAD_SCHEMA, "one entry per video"),
    "negative fps": (mutated(video_fps=[-1]), quality.BAD_SCHEMA, "video_fps[0] must be a positive number"),
    "image not str": (mutated(images=[3]), quality.BAD_SCHEMA, "images[0] must be a file path, got 3"),
    "lone surrogate": (mutated(messages=[USER, {"role": "assistant", "content": "bad \udcff"}]),
                       quality.NON_UTF8, "sample.messages[1].content is not valid UTF-8"),
    "bad modality": (mutated(meta={"modality": "smell"}), quality.BAD_SCHEMA, "meta.modality 'smell'"),
    "bad metric": (mutated(meta={"metric": "bleu"}), quality.BAD_SCHEMA,
                   "meta.metric 'bleu' is not one of ('exact_match', 'token_f1', 'wer')"),
}


@pytest.mark.parametrize("case", sorted(BAD_CASES))
def test_each_rule_rejects_with_its_reason_and_a_precise_message(case):
    sample, reason, message = BAD_CASES[case]
    with pytest.raises(SampleRejected) as info:
        validate_sample(sample)
    assert info.value.reason == reason
    assert message in str(info.value)


def test_valid_sample_is_normalised():
    out = validate_sample({"id": "t", "messages": [{"role": "user", "content": "hi"},
                                                    {"role": "assistant", "content": "yo"}]})
    assert out["images"] == out["videos"] == out["audios"] == []
    assert out["meta"]["modality"] == "text"
    assert validate_sample(VALID)["meta"]["modality"] == "image"
    assert validate_sample({**VALID, "meta": {"metric": "wer"}})["meta"]["metric"] == "wer"


def test_primary_modality_is_the_first_marker_unless_given():
    sample = {"messages": [{"role": "user", "content": "<audio> then <image>"}]}
    assert primary_modality(sample) == "audio"
    assert primary_modality({**sample, "meta": {"modality": "image"}}) == "image"


def test_max_length_in_chars_and_with_a_length_function():
    sample = validate_sample(VALID)
    chars = sum(len(m["content"]) for m in sample["messages"])
    assert check_length(sample, chars) == chars
    with pytest.raises(SampleRejected, match=f"too_long: length {chars} > max_length {chars - 1}"):
        validate_sample(VALID, max_length=chars - 1)
    with pytest.raises(SampleRejected, match="length 1000 > max_length 999"):
        validate_sample(VALID, max_length=999, length_fn=lambda s: 1000)


def test_token_length_function_uses_the_tokenizer():
    vocab = {"[UNK]": 0, "hello": 1, "world": 2}
    tokenizer = Tokenizer(WordLevel(vocab, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = WhitespaceSplit()
    sample = {"messages": [{"role": "user", "content": "hello world hello"},
                           {"role": "assistant", "content": "world"}]}
    assert make_token_length_fn(tokenizer)(sample) == 4


def test_to_processor_messages_splits_on_markers_and_keeps_text_verbatim():
    messages = [{"role": "user", "content": "<image>\nWhat <audio>and<video>"},
                {"role": "assistant", "content": "red"}]
    assert to_processor_messages(messages) == [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "\nWhat "}, {"type": "audio"},
                                     {"type": "text", "text": "and"}, {"type": "video"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "red"}]},
    ]


LLAVA = {
    "id": 33471,
    "image": "coco/000000033471.jpg",
    "conversations": [
        {"from": "system", "value": "Be exact."},
        {"from": "human", "value": "<image>\nWhat are the colors of the bus?"},
        {"from": "gpt", "value": "White and red."},
        {"from": "human", "value": "Where is it?"},
        {"from": "gpt", "value": "On a street."},
    ],
}


def test_llava_import_round_trip_keeps_the_content():
    sample = validate_sample(to_canonical(copy.deepcopy(LLAVA)))
    assert sample["id"] == "33471"
    assert sample["images"] == ["coco/000000033471.jpg"] and sample["videos"] == sample["audios"] == []
    assert [m["role"] for m in sample["messages"]] == ["system", "user", "assistant", "user", "assistant"]
    assert [m["content"] for m in sample["messages"]] == [t["value"] for t in LLAVA["conversations"]]
    assert sample["meta"] == {"source_format": "llava", "modality": "image"}
    assert json.loads(json.dumps(sample)) == sample  # plain JSON, storable as is


def test_uni_moe_video_frames_and_voice_lists():
    record = {"id": "v1", "video": ["f0.jpg", "f1.jpg"], "voice": ["a.wav", "b.wav"],
              "conversations": [{"from": "human", "value": "<video><audio><audio>?"}, {"from": "gpt", "value": "ok"}]}
    sample = validate_sample(llava_to_canonical(record))
    assert sample["videos"] == [["f0.jpg", "f1.jpg"]] and sample["audios"] == ["a.wav", "b.wav"]
    assert sample["meta"]["modality"] == "video"
    single = llava_to_canonical({**record, "video": "clip.mp4", "voice": None, "audio": "x.wav",
                                 "conversations": [{"from": "human", "value": "<video><audio>"},
                                                   {"from": "gpt", "value": "ok"}]})
    assert single["videos"] == ["clip.mp4"] and single["audios"] == ["x.wav"]


@pytest.mark.parametrize("record, reason, message", [
    ({**LLAVA, "audio": "a.wav", "voice": "b.wav"}, quality.BAD_SCHEMA, "both 'audio' and 'voice'"),
    ({**LLAVA, "conversations": [{"from": "bot", "value": "x"}]}, quality.BAD_SCHEMA, "conversations[0].from 'bot'"),
    ({**LLAVA, "image": 5}, quality.BAD_SCHEMA, "'image' must be a string or a list"),
])
def test_llava_import_errors(record, reason, message):
    with pytest.raises(SampleRejected) as info:
        llava_to_canonical(record)
    assert info.value.reason == reason and message in str(info.value)


def test_llava_first_turn_from_gpt_is_a_role_error_not_a_silent_fix():
    record = {**LLAVA, "conversations": LLAVA["conversations"][2:]}
    with pytest.raises(SampleRejected, match="bad_role_order: messages\\[0\\] has role 'assistant'"):
        validate_sample(to_canonical(record))


def test_jsonl_manifest_reports_bad_lines_by_position(tmp_path):
    good = json.dumps({"id": "a", "messages": []}).encode()
    path = tmp_path / "m.jsonl"
    path.write_bytes(good + b"\n{not json\n\n" + b'{"id": "\xff"}\n' + b"[1]\n")
    entries = list(read_manifest(path))
    assert [e.where for e in entries] == ["m.jsonl:1", "m.jsonl:2", "m.jsonl:4", "m.jsonl:5"]
    assert entries[0].record == {"id": "a", "messages": []} and entries[0].error is None
    assert [e.error.reason for e in entries[1:]] == [quality.MALFORMED_JSON, quality.NON_UTF8, quality.MALFORMED_JSON]
    assert entries[2].default_id == "m-00000004"


def test_json_manifest_is_a_list_and_a_broken_one_is_fatal(tmp_path):
    path = tmp_path / "llava.json"
    path.write_text(json.dumps([LLAVA, "oops"]))
    entries = list(read_manifest(path))
    assert entries[0].record == LLAVA and entries[1].error.reason == quality.MALFORMED_JSON
    path.write_text("[{")
    with pytest.raises(ValueError, match="llava.json is not a valid UTF-8 JSON document"):
        list(read_manifest(path))


def test_counters_round_trip_and_metrics():
    counters = DropCounters()
    counters.record_accept()
    counters.record_drop(quality.IMAGE_DECODE)
    counters.record_drop(quality.IMAGE_DECODE)
    restored = DropCounters.from_state_dict(json.loads(json.dumps(counters.state_dict())))
    assert restored == counters
    metrics = restored.merge(restored).as_metrics()
    assert metrics["data/seen"] == 6 and metrics["data/dropped/image_decode"] == 4
    assert metrics["data/drop_rate"] == pytest.approx(4 / 6)


def test_strict_policy_raises_naming_sample_shard_and_reason():
    error = SampleRejected(quality.EMPTY_ASSISTANT, "messages[1] (assistant) is empty")
    with pytest.raises(BadSampleError) as info:
        DropPolicy(strict=True).reject(DropCounters(), error, key="s-0007", shard="shard-000003.tar")
    assert (info.value.key, info.value.shard, info.value.reason) == ("s-0007", "shard-000003.tar", "empty_assistant")
    assert "'s-0007' in shard-000003.tar: empty_assistant" in str(info.value)
    assert isinstance(BadSampleError("only a message"), ValueError)  # DataLoader re-raise form


def test_drop_rate_ceiling_waits_for_min_samples_then_aborts():
    policy = DropPolicy(max_drop_rate=0.25, min_samples=4)
    counters = DropCounters()
    error = SampleRejected(quality.MISSING_MEDIA, "x")
    policy.reject(counters, error, key="a", shard="s")  # 1 of 1 dropped, but below min_samples
    counters.record_accept()
    counters.record_accept()
    with pytest.raises(DropRateExceeded, match=r"dropped 2 of 4 samples \(50.0% > max_drop_rate 25.0%\)"):
        policy.reject(counters, error, key="b", shard="s")
    with pytest.raises(ValueError, match="max_drop_rate"):
        DropPolicy(max_drop_rate=1.5)
