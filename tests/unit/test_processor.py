"""OmniMoeProcessor (modeling/processing_omni.py) and the tiny BPE tokenizer builder (data/tokenizer.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import sysconfig

import numpy as np

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import CLIPImageProcessorPil, PreTrainedTokenizerFast, WhisperFeatureExtractor

from omni_moe.modeling.configuration_omni import OmniMoeConfig
from omni_moe.modeling.media import (
    audio_chunk_count,
    audio_seconds_per_token,
    audio_token_count,
    image_token_count,
    image_token_grid,
    video_token_count,
    video_token_grid,
)
from omni_moe.modeling.positions import MediaSpan, build_position_ids
from omni_moe.modeling.processing_omni import IGNORE_INDEX, OmniMoeProcessor, count_media_parts
from omni_moe.data.tokenizer import build_bpe_tokenizer
from omni_moe.modeling.tokenizer_utils import SPECIAL_TOKENS, ensure_special_tokens
from tests.tiny import tiny_audio_config, tiny_llm_fields, tiny_vision_config

TEXTS = [
    "Hello world, what is in this picture?",
    "A red circle on a blue square, next to a green triangle.",
    "The quick brown fox jumps over the lazy dog.",
    "Transcribe the audio: one two three four five six seven eight nine.",
    "The video shows a ball moving from left to right.",
]
SPECIAL_STRINGS = ["<image>", "<video>", "<audio>", *SPECIAL_TOKENS]
SAMPLE_RATE = 16000


@pytest.fixture(scope="module")
def tokenizer():
    return build_bpe_tokenizer(TEXTS, vocab_size=300)


def make_config(tokenizer, **kw) -> OmniMoeConfig:
    fields = tiny_llm_fields(vocab_size=len(tokenizer))
    fields.update(
        moe_layers="none",
        vision_config=tiny_vision_config(),  # 32 px, patch 8 -> 4x4 grid
        audio_config=tiny_audio_config(),  # 80 mels, 50 positions -> 100 mel frames (1 s) per chunk
        image_token_id=tokenizer.convert_tokens_to_ids("<|image|>"),
        video_token_id=tokenizer.convert_tokens_to_ids("<|video|>"),
        audio_token_id=tokenizer.convert_tokens_to_ids("<|audio|>"),
    )
    fields.update(kw)
    return OmniMoeConfig(**fields)


def make_processor(tokenizer, config=None, **kw) -> OmniMoeProcessor:
    config = config if config is not None else make_config(tokenizer)
    image_processor = CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    feature_extractor = WhisperFeatureExtractor(feature_size=80, sampling_rate=SAMPLE_RATE, chunk_length=1)
    return OmniMoeProcessor.from_config(config, tokenizer, image_processor, feature_extractor, **kw)


@pytest.fixture(scope="module")
def processor(tokenizer):
    return make_processor(tokenizer, config=make_config(tokenizer, video_temporal_pooling=2, audio_pooling=2),
                          video_num_frames=4, video_fps=2.0)


def image(seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (40, 36, 3), dtype=np.uint8))


def audio(seconds: float, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(int(seconds * SAMPLE_RATE)).astype(np.float32)


def user(*parts):
    return {"role": "user", "content": [p if isinstance(p, dict) else {"type": p} for p in parts]}


def text(s):
    return {"type": "text", "text": s}


def assistant(s):
    return {"role": "assistant", "content": s}


def placeholder_ids(tokenizer):
    return {m: tokenizer.convert_tokens_to_ids(f"<|{m}|>") for m in ("image", "video", "audio")}


def runs_of(row: torch.Tensor, token_id: int) -> list[tuple[int, int]]:
    """(start, length) of each maximal run of `token_id` in a 1-D tensor."""
    runs, start = [], None
    for i, v in enumerate([*row.tolist(), None]):
        if v == token_id and start is None:
            start = i
        elif v != token_id and start is not None:
            runs.append((start, i - start))
            start = None
    return runs


MIXED = [
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Say hello."}, assistant("Hello world.")],
    [user("image", text("What is this?")), assistant("A red circle.")],
    [user("video", "audio", text("What happens?")), assistant("A ball moves.")],
    [user("audio", text("Transcribe.")), assistant("one two three")],
]


def mixed_media():
    return dict(images=[image(1)], videos=[[image(i) for i in range(6)]], audios=[audio(0.7, 1), audio(2.5, 2)])


# ---------------------------------------------------------------------------------------------- tokenizer
def test_build_bpe_tokenizer_is_deterministic_with_specials_and_template(tokenizer, tmp_path):
    again = build_bpe_tokenizer(TEXTS, vocab_size=300, out_dir=str(tmp_path))
    assert again.get_vocab() == tokenizer.get_vocab() and 256 + len(SPECIAL_TOKENS) < len(tokenizer) <= 300
    assert again.backend_tokenizer.to_str() == tokenizer.backend_tokenizer.to_str()
    assert [tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS] == list(range(len(SPECIAL_TOKENS)))
    assert tokenizer.pad_token == "<|endoftext|>" and tokenizer.eos_token == "<|im_end|>"
    assert set(SPECIAL_TOKENS) <= set(tokenizer.all_special_tokens)
    rendered = tokenizer.apply_chat_template([user("image", text("hi")), assistant("yo")], tokenize=False,
                                             add_generation_prompt=True)
    assert rendered == "<|im_start|>user\n<|image|>hi<|im_end|>\n<|im_start|>assistant\nyo<|im_end|>\n<|im_start|>assistant\n"
    loaded = type(tokenizer).from_pretrained(str(tmp_path))
    assert loaded.chat_template == tokenizer.chat_template
    assert loaded("a <|audio|> b").input_ids == tokenizer("a <|audio|> b").input_ids
    with pytest.raises(ValueError, match="vocab_size"):
        build_bpe_tokenizer(TEXTS, vocab_size=100)


def test_bpe_from_a_manifest_learns_the_chat_template_role_lines(tmp_path):
    from omni_moe.training.build import manifest_texts

    manifest = tmp_path / "train.jsonl"
    with manifest.open("w") as handle:
        for i in range(40):
            messages = [{"role": "user", "content": f"<image>\nWhat colour is shape {i}?"},
                        {"role": "assistant", "content": ["red", "blue"][i % 2]}]
            handle.write(json.dumps({"id": f"s{i}", "messages": messages}) + "\n")
    texts = manifest_texts(manifest)
    assert texts[:2] == ["user\n<image>\nWhat colour is shape 0?", "assistant\nred"] and len(texts) == 80
    with_roles = build_bpe_tokenizer(texts, vocab_size=300)
    contents_only = build_bpe_tokenizer([t.split("\n", 1)[1] for t in texts], vocab_size=300)
    conversation = [{"role": "user", "content": "What colour is shape 3?"}, {"role": "assistant", "content": "red"}]
    rendered = with_roles.apply_chat_template(conversation, tokenize=False)
    assert "assistant" in with_roles.tokenize(rendered)  # one token, as in every sample the model trains on
    assert len(with_roles(rendered).input_ids) < len(contents_only(rendered).input_ids)


def test_ensure_special_tokens_adds_only_missing(tokenizer, tmp_path):
    # A Qwen2-like tokenizer that has the ChatML tokens but none of our placeholders.
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    plain = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|im_end|>",
                                    extra_special_tokens=["<|endoftext|>", "<|im_start|>"])
    before = {t: plain.convert_tokens_to_ids(t) for t in ("<|endoftext|>", "<|im_start|>", "<|im_end|>")}
    ids = ensure_special_tokens(plain)
    assert set(ids) == set(SPECIAL_TOKENS) and len(set(ids.values())) == len(SPECIAL_TOKENS)
    assert all(ids[t] == i for t, i in before.items())  # existing ids unchanged
    assert plain.pad_token == "<|endoftext|>"
    assert ensure_special_tokens(plain) == ids and len(plain) == len(SPECIAL_TOKENS)  # idempotent
    assert plain("x<|video|>").input_ids[-1] == ids["<|video|>"]


# ---------------------------------------------------------------------------------------------- expansion
@pytest.mark.parametrize(
    "overrides",
    [
        dict(),
        dict(image_pooling=2, video_temporal_pooling=2, audio_pooling=3),
        dict(image_projector="qformer", audio_projector="qformer", qformer_num_queries=3),
    ],
    ids=["plain", "pooling", "qformer"],
)
def test_placeholders_expand_to_media_counts(tokenizer, overrides):
    config = make_config(tokenizer, **overrides)
    proc = make_processor(tokenizer, config, video_num_frames=3)
    media = mixed_media()
    out = proc(MIXED, **media)
    ph = placeholder_ids(tokenizer)
    n_samples = [len(a) for a in media["audios"]]
    expected_audio = [audio_token_count(config, n) for n in n_samples]
    expected_chunks = [audio_chunk_count(config, n) for n in n_samples]
    assert expected_chunks == [1, 3]  # 0.7 s and 2.5 s with 1 s chunks: the long clip is multi-chunk
    assert out["audio_token_counts"].tolist() == expected_audio
    assert out["audio_chunk_counts"].tolist() == expected_chunks
    assert tuple(out["audio_features"].shape) == (sum(expected_chunks), 80, 100)
    assert tuple(out["pixel_values"].shape) == (1, 3, 32, 32)
    assert tuple(out["pixel_values_videos"].shape) == (1, 3, 3, 32, 32)
    # every placeholder becomes one contiguous run of exactly the count media.py gives, in part order
    assert [n for _, n in runs_of(out["input_ids"][1], ph["image"])] == [image_token_count(config)]
    assert [n for _, n in runs_of(out["input_ids"][2], ph["video"])] == [video_token_count(config, 3)]
    assert [n for _, n in runs_of(out["input_ids"][2], ph["audio"])] == expected_audio[:1]
    assert [n for _, n in runs_of(out["input_ids"][3], ph["audio"])] == expected_audio[1:]
    assert not any(runs_of(out["input_ids"][0], i) for i in ph.values())


def test_video_frames_sampled_uniformly_and_padded(tokenizer):
    proc = make_processor(tokenizer, video_num_frames=4)
    frames = [Image.new("RGB", (32, 32), (40 * i, 0, 0)) for i in range(7)]
    short = [Image.new("RGB", (32, 32), (0, 90 * i, 0)) for i in range(2)]
    out = proc([[user("video")], [user("video")]], videos=[frames, short])
    videos = out["pixel_values_videos"]
    alone = proc.image_processor(images=frames + short, return_tensors="pt")["pixel_values"]
    # 7 frames -> indices 0, 2, 4, 6; 2 frames -> 0, 0, 1, 1 (padded by repeating)
    assert torch.equal(videos[0], alone[[0, 2, 4, 6]])
    assert torch.equal(videos[1], alone[[7, 7, 8, 8]])


# ---------------------------------------------------------------------------------------------- labels, modality ids, positions
def test_labels_only_on_assistant_content_and_im_end(tokenizer, processor):
    conv = [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Hello world"},
        assistant("A red circle."),
        user("image", text("And this?")),
        {"role": "assistant", "content": [text("A blue "), text("square.")]},
    ]
    out = processor([conv], images=[image()])
    ids, labels = out["input_ids"][0], out["labels"][0]
    trained = labels != IGNORE_INDEX
    assert torch.equal(labels[trained], ids[trained])
    assert tokenizer.decode(ids[trained]) == "A red circle.<|im_end|>A blue square.<|im_end|>"
    assert not trained[out["modality_ids"][0] != 0].any()
    # generation prompt: no assistant content, nothing trained
    prompt = processor([conv[:2]], add_generation_prompt=True)
    assert (prompt["labels"] == IGNORE_INDEX).all()
    assert tokenizer.decode(prompt["input_ids"][0]).endswith("<|im_start|>assistant\n")
    # an empty assistant turn still trains its <|im_end|>
    empty = processor([[conv[1], assistant("")]])
    assert tokenizer.decode(empty["input_ids"][0][empty["labels"][0] != IGNORE_INDEX]) == "<|im_end|>"
    assert "labels" not in processor([conv[:2]], return_labels=False)


def test_modality_ids_line_up_with_placeholders(tokenizer, processor):
    out = processor(MIXED, **mixed_media())
    expected = torch.zeros_like(out["input_ids"])
    for name, token_id in placeholder_ids(tokenizer).items():
        expected[out["input_ids"] == token_id] = processor.modalities.index(name)
    assert torch.equal(out["modality_ids"], expected)
    assert set(out["modality_ids"].unique().tolist()) == {0, 1, 2, 3}


def test_position_ids_match_build_position_ids(tokenizer, processor):
    media = mixed_media()
    out = processor(MIXED, **media)
    config, ph = processor._count_config, placeholder_ids(tokenizer)
    lengths = out["attention_mask"].sum(1).tolist()
    longest = out["input_ids"].shape[1]
    t, h, w = video_token_grid(config, 4)
    grids = {"image": (1, *image_token_grid(config)), "video": (t, h, w)}
    seconds = {"image": 0.0, "video": 6 / (2.0 * t), "audio": audio_seconds_per_token(config)}
    audio_counts = iter(out["audio_token_counts"].tolist())
    for b, length in enumerate(lengths):
        row = out["input_ids"][b, :length]
        runs = sorted((start, name, n) for name, i in ph.items() for start, n in runs_of(row, i))
        spans, previous_end, previous = [], None, None
        for start, name, n in runs:
            grid = (next(audio_counts), 1, 1) if name == "audio" else grids[name]
            aligned = name == "audio" and previous == "video" and previous_end == start
            spans.append(MediaSpan(start, name, grid, seconds[name], align_with_previous=aligned))
            previous, previous_end = name, start + n
        expected, delta = build_position_ids(length, spans, processor.positions_per_second)
        assert torch.equal(out["position_ids"][:, b, :length], expected)
        assert out["rope_deltas"][b].item() == delta - (longest - length) == int(expected.max()) + 1 - longest
    # the video's soundtrack starts at the video's first time id
    video_start = runs_of(out["input_ids"][2], ph["video"])[0][0]
    audio_start = runs_of(out["input_ids"][2], ph["audio"])[0][0]
    assert out["position_ids"][0, 2, audio_start] == out["position_ids"][0, 2, video_start]


# ---------------------------------------------------------------------------------------------- text is text
special_heavy_text = st.lists(
    st.one_of(st.sampled_from(SPECIAL_STRINGS), st.text(max_size=12), st.sampled_from([" ", "  ", "\n", "\n\n", "é", "|>"])),
    max_size=6,
).map("".join)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(user_text=special_heavy_text, reply=special_heavy_text, as_parts=st.booleans())
def test_typed_special_strings_never_become_special_ids(tokenizer, processor, user_text, reply, as_parts):
    content = [text(user_text)] if as_parts else user_text
    conv = [{"role": "user", "content": content}, assistant(reply)]
    out = processor([conv])
    ids = out["input_ids"][0].tolist()
    special_ids = {tokenizer.convert_tokens_to_ids(t): t for t in SPECIAL_TOKENS}
    structural = [special_ids[i] for i in ids if i in special_ids]
    assert structural == ["<|im_start|>", "<|im_end|>", "<|im_start|>", "<|im_end|>"]
    # byte-level BPE is lossless: the ids spell exactly the rendered conversation, typed specials included
    rendered = processor.apply_chat_template(conv)
    assert tokenizer.decode(ids) == rendered
    trained = out["labels"][0] != IGNORE_INDEX
    assert tokenizer.decode(out["input_ids"][0][trained]) == reply + "<|im_end|>"
    if not any(s in typed for typed in (user_text, reply) for s in SPECIAL_TOKENS):
        assert ids == tokenizer(rendered, split_special_tokens=False).input_ids


def test_apply_chat_template_matches_processor_for_text(tokenizer, processor):
    conversations = [
        [{"role": "system", "content": "  Be brief. "}, {"role": "user", "content": "\n\nHello   world\t"},
         assistant("   Hi there!\n")],
        [{"role": "user", "content": [text("What is "), text("this? ünïcödé ✓")]}],
    ]
    for conv in conversations:
        for gen in (False, True):
            rendered = processor.apply_chat_template(conv, add_generation_prompt=gen)
            expected = tokenizer(rendered, split_special_tokens=False).input_ids
            assert processor([conv], add_generation_prompt=gen)["input_ids"][0].tolist() == expected
            assert processor.apply_chat_template(conv, add_generation_prompt=gen, tokenize=True).tolist() == expected
    with_media = [user({"type": "image", "image": image()}, text("hi"))]
    assert torch.equal(processor.apply_chat_template(with_media, tokenize=True), processor([with_media], images=[image()])["input_ids"][0])
    ids = processor([conversations[1]])["input_ids"][0]
    assert processor.decode(ids) == tokenizer.decode(ids)
    assert processor.batch_decode(ids[None]) == [tokenizer.decode(ids)]


# ---------------------------------------------------------------------------------------------- batching and round trip
@pytest.mark.parametrize("side", ["right", "left"])
def test_mixed_batch_pads_consistently(tokenizer, processor, side):
    media = mixed_media()
    out = processor(MIXED, padding_side=side, **media)
    alone = [
        processor([MIXED[0]]),
        processor([MIXED[1]], images=media["images"]),
        processor([MIXED[2]], videos=media["videos"], audios=media["audios"][:1]),
        processor([MIXED[3]], audios=media["audios"][1:]),
    ]
    longest = out["input_ids"].shape[1]
    assert longest == max(a["input_ids"].shape[1] for a in alone)
    for b, single in enumerate(alone):
        length = single["input_ids"].shape[1]
        real = slice(0, length) if side == "right" else slice(longest - length, longest)
        pad = slice(length, longest) if side == "right" else slice(0, longest - length)
        for key in ("input_ids", "modality_ids", "labels"):
            assert torch.equal(out[key][b, real], single[key][0]), key
        assert torch.equal(out["position_ids"][:, b, real], single["position_ids"][:, 0])
        assert (out["attention_mask"][b, real] == 1).all() and (out["attention_mask"][b, pad] == 0).all()
        assert (out["input_ids"][b, pad] == tokenizer.pad_token_id).all()
        assert (out["labels"][b, pad] == IGNORE_INDEX).all() and (out["modality_ids"][b, pad] == 0).all()
        assert out["rope_deltas"][b] == single["rope_deltas"][0] - (longest - length)
        assert (out["labels"][b] != IGNORE_INDEX).any()
    assert all(v.shape[-1] == longest for k, v in out.items() if k in ("input_ids", "attention_mask", "labels"))


def test_save_pretrained_round_trip(tokenizer, processor, tmp_path):
    processor.save_pretrained(str(tmp_path / "full"))
    loaded = OmniMoeProcessor.from_pretrained(str(tmp_path / "full"))
    saved = json.loads((tmp_path / "full" / "processor_config.json").read_text())
    assert saved["auto_map"] == {"AutoProcessor": "processing_omni.OmniMoeProcessor"}
    settings = lambda proc: {k: v for k, v in proc.to_dict().items() if k != "auto_map"}  # noqa: E731
    assert settings(loaded) == settings(processor)
    media = mixed_media()
    a, b = processor(MIXED, **media), loaded(MIXED, **media)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)



# A model without one encoder: that sub-processor is absent (None) and stays absent through the round trip.
PARTIAL = {"image_processor": ({"vision_config": None}, "audio", "image", "no image processor"),
           "feature_extractor": ({"audio_config": None}, "image", "audio", "no feature extractor")}


def partial_processor(tokenizer, absent: str) -> OmniMoeProcessor:
    overrides = PARTIAL[absent][0]
    return OmniMoeProcessor.from_config(make_config(tokenizer, **overrides), tokenizer, video_num_frames=2)


def partial_inputs(kind: str) -> tuple[list, dict]:
    return [[user(kind)]], ({"audios": [audio(1.3)]} if kind == "audio" else {"images": [image()]})


@pytest.mark.parametrize("absent", sorted(PARTIAL))
def test_save_pretrained_round_trip_without_one_sub_processor(tokenizer, absent, tmp_path):
    _, present_kind, absent_kind, message = PARTIAL[absent]
    partial = partial_processor(tokenizer, absent)
    assert getattr(partial, absent) is None
    partial.save_pretrained(str(tmp_path))
    assert json.loads((tmp_path / "processor_config.json").read_text())[absent] is None
    reloaded = OmniMoeProcessor.from_pretrained(str(tmp_path))
    assert getattr(reloaded, absent) is None and reloaded.video_num_frames == 2
    settings = lambda proc: {k: v for k, v in proc.to_dict().items() if k != "auto_map"}  # noqa: E731
    assert settings(reloaded) == settings(partial)
    conv, media = partial_inputs(present_kind)
    a, b = partial(conv, **media), reloaded(conv, **media)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    conv, media = partial_inputs(absent_kind)
    with pytest.raises(ValueError, match=message):
        reloaded(conv, **media)


# A fresh interpreter that cannot import this project loads the saved folder through AutoProcessor and the folder's
# own remote code (as a user of an exported model does). argv: site-packages, folder, absent attribute, out file.
FRESH_AUTO_PROCESSOR = r"""
import importlib.util, json, sys
sys.path.append(sys.argv[1])
assert importlib.util.find_spec("omni_moe") is None, "the project is importable"
from transformers import AutoProcessor
processor = AutoProcessor.from_pretrained(sys.argv[2], trust_remote_code=True)
conv = [[{"role": "user", "content": [{"type": "text", "text": "hello there"}]}]]
json.dump({"class": type(processor).__name__, "module": type(processor).__module__,
           "absent": getattr(processor, sys.argv[3]) is None,
           "ids": processor(conv)["input_ids"].tolist()}, open(sys.argv[4], "w"))
"""


@pytest.mark.parametrize("absent", sorted(PARTIAL))
def test_auto_processor_with_remote_code_loads_without_one_sub_processor(tokenizer, absent, tmp_path):
    partial = partial_processor(tokenizer, absent)
    folder, out = tmp_path / "folder", tmp_path / "fresh.json"
    partial.save_pretrained(str(folder))
    env = {"PATH": os.environ.get("PATH", ""), "HOME": str(tmp_path), "HF_HOME": str(tmp_path / "hf_home"),
           "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, "-I", "-S", "-c", FRESH_AUTO_PROCESSOR, sysconfig.get_paths()["purelib"],
                    str(folder), absent, str(out)], cwd=tmp_path, env=env, check=True, timeout=120)
    report = json.loads(out.read_text())
    conv = [[user(text("hello there"))]]
    assert report["class"] == "OmniMoeProcessor" and not report["module"].startswith("modeling")
    assert report["absent"] and report["ids"] == partial(conv)["input_ids"].tolist()


# ---------------------------------------------------------------------------------------------- errors
def test_count_media_parts_and_clear_errors(tokenizer, processor):
    assert count_media_parts(MIXED[2]) == {"image": 0, "video": 1, "audio": 1}
    with pytest.raises(ValueError, match=r"2 image part\(s\) in the conversations \(sample 0: 1, sample 1: 1\) but 1"):
        processor([[user("image")], [user("image")]], images=[image()])
    with pytest.raises(ValueError, match=r"0 audio part\(s\).*1 audio\(s\) given"):
        processor([[user(text("hi"))]], audios=[audio(1.0)])
    with pytest.raises(ValueError, match="sample 1, message 0: unknown role 'robot'"):
        processor([[user(text("hi"))], [{"role": "robot", "content": "x"}]])
    with pytest.raises(ValueError, match="sample 0, message 0, part 1: unknown part type 'gif'"):
        processor([[user(text("hi"), {"type": "gif"})]])
    with pytest.raises(ValueError, match="audio 0: expected a non-empty 1-D"):
        processor([[user("audio")]], audios=[np.zeros(0, np.float32)])
    short = make_processor(tokenizer, max_length=20)
    with pytest.raises(ValueError, match=r"sample 1 has \d+ tokens, more than max_length=20"):
        short([[user(text("hi"))], [user("image")]], images=[image()])
    with pytest.raises(ValueError, match="image_token_id"):
        make_processor(tokenizer, make_config(tokenizer, image_token_id=7))
    with pytest.raises(ValueError, match="ensure_special_tokens"):
        OmniMoeProcessor(None, None, PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.BPE())))


@pytest.mark.parametrize("kind", ["clip", "siglip"])
def test_from_config_builds_default_sub_processors(tokenizer, kind):
    config = make_config(tokenizer, vision_config=tiny_vision_config(kind))
    proc = OmniMoeProcessor.from_config(config, tokenizer)
    out = proc([[user("image", "audio")]], images=[image()], audios=[audio(1.5)])
    assert tuple(out["pixel_values"].shape) == (1, 3, 32, 32)
    assert tuple(out["audio_features"].shape) == (2, 80, 100)
    assert (out["input_ids"] == placeholder_ids(tokenizer)["image"]).sum() == image_token_count(config)
