"""The synthetic omni dataset (data/synth.py): determinism, splits, coverage, format, and that
the media really encode what the answers say (FFT-decoded digits, shape centroids, pixel colours)."""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import json
import time
import wave
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from omni_moe.data import synth, synth_media

ALL_TASKS = list(synth.TASKS)
MARKERS = {"images": "<image>", "videos": "<video>", "audios": "<audio>"}


def read_manifest(path: Path) -> list[dict]:
    with open(path, encoding="utf-8") as handle:
        return [json.loads(line) for line in handle]


def file_digests(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def default_dataset(tmp_path_factory):
    """The default-size dataset, generated once (and timed: it must take seconds, not minutes)."""
    out = tmp_path_factory.mktemp("synth_default")
    started = time.perf_counter()
    manifests = synth.generate(out)
    elapsed = time.perf_counter() - started
    print(f"\ndefault synth dataset ({synth.DEFAULT_NUM} train samples + val/test) generated in {elapsed:.2f} s")
    assert elapsed < 30, f"default generation took {elapsed:.1f} s"
    return out, {split: read_manifest(path) for split, path in manifests.items()}


# ----------------------------------------------------------------------------- format

def check_sample(sample: dict, media_root: Path) -> None:
    """The canonical-format rules (roles, markers vs media, non-empty answers, media exist)."""
    sid = sample["id"]
    messages = sample["messages"]
    roles = [m["role"] for m in messages]
    body = roles[1:] if roles and roles[0] == "system" else roles
    assert body and len(body) % 2 == 0, f"{sid}: roles {roles}"
    assert body == ["user", "assistant"] * (len(body) // 2), f"{sid}: roles {roles}"
    for m in messages:
        assert isinstance(m["content"], str) and m["content"].encode("utf-8").decode("utf-8") == m["content"]
        if m["role"] == "assistant":
            assert m["content"].strip(), f"{sid}: empty assistant turn"
    text = "".join(m["content"] for m in messages)
    for field, marker in MARKERS.items():
        assert text.count(marker) == len(sample.get(field, [])), f"{sid}: {marker} count vs {field}"
    for path in sample.get("images", []) + sample.get("audios", []) + sum(sample.get("videos", []), []):
        assert not Path(path).is_absolute() and (media_root / path).is_file(), f"{sid}: missing {path}"
    if "video_fps" in sample:
        assert len(sample["video_fps"]) == len(sample["videos"]) and all(f > 0 for f in sample["video_fps"])
    meta = sample["meta"]
    task = synth.TASKS[meta["task"]]
    assert meta["modality"] == task.modality and meta["dataset"] == "synth"
    assert meta.get("metric") == task.metric, f"{sid}: meta.metric is not its task's"
    assert meta["answer"] == messages[-1]["content"], f"{sid}: meta.answer differs from the assistant turn"
    first_media = next((kind for kind in ("images", "videos", "audios") if sample.get(kind)), None)
    derived = {"images": "image", "videos": "video", "audios": "audio", None: "text"}[first_media]
    assert meta["modality"] == derived, f"{sid}: modality {meta['modality']} but media say {derived}"
    assert sid.startswith(f"{meta['split']}-{meta['modality']}-") and "." not in sid


def test_every_sample_follows_the_format(default_dataset):
    root, splits = default_dataset
    schema = importlib.util.find_spec("omni_moe.data.schema")
    validate = getattr(importlib.import_module("omni_moe.data.schema"), "validate_sample", None) if schema else None
    for split, samples in splits.items():
        assert len({s["id"] for s in samples}) == len(samples), f"{split}: duplicate ids"
        for sample in samples:
            check_sample(sample, root)
            assert sample["meta"]["split"] == split
            if validate is not None:  # the pipeline's own validator, once data/schema.py exists
                validate(sample)
    eval_num = synth.DEFAULT_NUM // 10
    assert [len(splits[s]) for s in ("train", "val", "test")] == [synth.DEFAULT_NUM, eval_num, eval_num]
    counts = Counter(s["meta"]["task"] for s in splits["train"])
    assert set(counts) == set(ALL_TASKS) and max(counts.values()) - min(counts.values()) <= 1, counts


def test_tasks_and_their_metrics():
    for name, task in synth.TASKS.items():
        assert len(set(task.phrasings)) >= 3, name
        assert task.modality in ("image", "audio", "video", "text") and name.startswith(task.modality)
    # the digit transcription is judged word by word (WER); no other task declares a metric
    assert {name: task.metric for name, task in synth.TASKS.items() if task.metric} == {"audio_transcribe": "wer"}


# ----------------------------------------------------------------------------- determinism / splits

def test_same_seed_identical_bytes_different_seed_different(tmp_path):
    kwargs = dict(num=44, eval_num=11)
    synth.generate(tmp_path / "a", seed=5, **kwargs)
    synth.generate(tmp_path / "b", seed=5, **kwargs)
    synth.generate(tmp_path / "c", seed=6, **kwargs)
    a, b, c = (file_digests(tmp_path / name) for name in "abc")
    assert len(a) > 60 and a == b  # every file byte-identical, same file set
    assert a.keys() == c.keys()
    media = [k for k in a if not k.endswith(".jsonl")]
    same = [k for k in media if a[k] == c[k]]
    assert not same, f"seed 6 reproduced seed-5 media: {same[:5]}"
    assert a["train.jsonl"] != c["train.jsonl"]


def test_existing_split_needs_overwrite(tmp_path):
    synth.generate(tmp_path, num=11, splits=["val"])
    with pytest.raises(FileExistsError, match="overwrite"):
        synth.generate(tmp_path, num=11, splits=["val"])
    before = file_digests(tmp_path)
    synth.generate(tmp_path, num=11, splits=["val"], overwrite=True)
    assert file_digests(tmp_path) == before


def test_splits_have_disjoint_seeds_ids_and_media(tmp_path, default_dataset):
    seeds = {synth.split_seed(seed, split) for seed in range(100) for split in synth.SPLIT_INDEX}
    assert len(seeds) == 100 * len(synth.SPLIT_INDEX)
    with pytest.raises(ValueError, match="unknown split"):
        synth.split_seed(0, "dev")
    # The streams differ: the same index in two splits gets different content.
    plans = {s: [synth.plan_sample(0, s, i, ALL_TASKS, 32) for i in range(len(ALL_TASKS))] for s in synth.SPLIT_INDEX}
    assert plans["train"][0].render != plans["val"][0].render != plans["test"][0].render

    root, splits = default_dataset
    ids = [{s["id"] for s in samples} for samples in splits.values()]
    assert not (ids[0] & ids[1] or ids[0] & ids[2] or ids[1] & ids[2])
    # No picture, clip or frame sequence of one split recurs in another.
    def media_hashes(samples):
        paths = [p for s in samples for p in s.get("images", []) + s.get("audios", [])]
        hashes = {hashlib.sha256((root / p).read_bytes()).hexdigest() for p in paths}
        assert len(hashes) == len(paths), "a media file repeats inside one split"
        return hashes
    train, val, test = (media_hashes(splits[s]) for s in ("train", "val", "test"))
    assert not (train & val or train & test or val & test)

    # A split's media come from its own seed only: generated alone, the test split is byte-identical.
    synth.generate(tmp_path, splits=["test"], eval_num=synth.DEFAULT_NUM // 10)
    alone = file_digests(tmp_path)
    full = {k: v for k, v in file_digests(root).items() if "/test/" in k or k == "test.jsonl"}
    assert alone == full


# ----------------------------------------------------------------------------- coverage

def test_coverage_of_every_combination():
    per_task = {name: [] for name in ALL_TASKS}
    n = len(ALL_TASKS) * len(synth.SHAPES) * len(synth.COLOURS) * len(synth.POSITIONS)  # one full image cycle
    for i in range(n):
        plan = synth.plan_sample(3, "train", i, ALL_TASKS, 32)
        per_task[plan.task].append(plan)
    for name in ("image_caption", "image_colour", "image_shape", "image_position"):
        combos = {(p.attributes["shape"], p.attributes["colour"], p.attributes["position"]) for p in per_task[name]}
        assert len(combos) == 4 * 6 * 4 and len(synth.SHAPES) >= 4 and len(synth.COLOURS) >= 6, name
    for name in ("video_direction", "video_shape"):
        plans = per_task[name]
        assert {(p.attributes["shape"], p.attributes["direction"]) for p in plans} == {
            (s, d) for s in synth.SHAPES for d in synth.DIRECTIONS}
        assert Counter(p.attributes["direction"] for p in plans) == {d: len(plans) // 4 for d in synth.DIRECTIONS}
    audio = per_task["audio_transcribe"] + per_task["audio_count"]
    assert Counter(p.attributes["count"] for p in audio) == {2: len(audio) // 3, 3: len(audio) // 3, 4: len(audio) // 3}
    assert {d for p in audio for d in p.answer.split()} <= set("0123456789")
    assert {d for p in per_task["audio_transcribe"] for d in p.answer.split()} == set("0123456789")
    for name, plans in per_task.items():  # every phrasing is used
        used = {p.question for p in plans}
        if "{" not in "".join(synth.TASKS[name].phrasings):
            assert used == set(synth.TASKS[name].phrasings), name
        else:
            assert len(used) >= 3, name
    assert all(p.answer == " ".join(reversed(p.attributes["seq"].split())) for p in per_task["text_reverse"])
    assert all(p.answer == str(p.attributes["a"] + p.attributes["b"]) for p in per_task["text_add"])


# ----------------------------------------------------------------------------- media encode the answers

def decode_digits(path: Path) -> tuple[list[str], float]:
    """Recover the digits of a clip: energy segmentation, then an FFT peak in each tone band."""
    with wave.open(str(path), "rb") as handle:
        assert (handle.getnchannels(), handle.getsampwidth(), handle.getframerate()) == (1, 2, 16000)
        audio = np.frombuffer(handle.readframes(handle.getnframes()), dtype="<i2") / 32768.0
    window = 80  # 5 ms
    rms = np.sqrt((audio[: len(audio) // window * window].reshape(-1, window) ** 2).mean(axis=1))
    active = np.concatenate([[False], rms > 0.03, [False]])
    edges = np.flatnonzero(np.diff(active.astype(int)))
    inverse = {tones: digit for digit, tones in synth_media.DIGIT_TONES.items()}
    digits = []
    for start, stop in zip(edges[::2] * window, edges[1::2] * window):
        segment = audio[start:stop]
        spectrum = np.abs(np.fft.rfft(segment * np.hanning(len(segment))))
        freqs = np.fft.rfftfreq(len(segment), 1 / 16000)
        low_band, high_band = (freqs > 300) & (freqs < 1500), (freqs > 1500) & (freqs < 4000)
        low = freqs[low_band][spectrum[low_band].argmax()]
        high = freqs[high_band][spectrum[high_band].argmax()]
        nearest_low = min(synth_media.LOW_TONES_HZ, key=lambda f: abs(f - low))
        nearest_high = min(synth_media.HIGH_TONES_HZ, key=lambda f: abs(f - high))
        assert abs(nearest_low - low) < 40 and abs(nearest_high - high) < 40, (path, low, high)
        digits.append(inverse[(nearest_low, nearest_high)])
    return digits, len(audio) / 16000


def test_audio_encodes_the_digits(default_dataset):
    root, splits = default_dataset
    audio = [s for s in splits["val"] + splits["test"] if s["meta"]["modality"] == "audio"]
    assert len(audio) >= 100
    for sample in audio:
        digits, seconds = decode_digits(root / sample["audios"][0])
        assert seconds <= 1.0, sample["id"]
        assert " ".join(digits) == sample["meta"]["attributes"]["digits"], sample["id"]
        expected = " ".join(digits) if sample["meta"]["task"] == "audio_transcribe" else str(len(digits))
        assert sample["meta"]["answer"] == expected and 2 <= len(digits) <= 4, sample["id"]


def shape_mask(image: Image.Image) -> np.ndarray:
    pixels = np.asarray(image.convert("RGB")).astype(int)
    return np.abs(pixels - pixels[0, 0]).sum(axis=-1) > 60  # the corner is always background (margin)


def nearest_colour(rgb) -> str:
    return min(synth.COLOURS, key=lambda name: np.abs(np.array(synth.COLOURS[name]) - rgb).sum())


def classify_shape(mask: np.ndarray) -> str:
    """Tell the four shapes apart from their pixel mask (bounding-box fill and row widths)."""
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    box = mask[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1]
    widths = box.sum(axis=1)
    fill = box.mean()
    if fill > 0.97:
        return "square"
    if widths[0] <= 2 and widths[-1] == box.shape[1]:
        return "triangle"
    if widths[0] == widths[-1] and widths[len(widths) // 2] == box.shape[1] and fill < 0.7:
        return "cross"
    if 0.65 < fill < 0.92:
        return "circle"
    return "unknown"


def test_images_show_the_stated_shape_colour_and_position(default_dataset):
    root, splits = default_dataset
    images = [s for s in splits["val"] if s["meta"]["modality"] == "image"]
    assert len(images) >= 100
    for sample in images:
        attrs = sample["meta"]["attributes"]
        image = Image.open(root / sample["images"][0])
        assert image.mode == "RGB" and image.size == (32, 32), sample["id"]
        mask = shape_mask(image)
        ys, xs = np.nonzero(mask)
        vertical = "bottom" if ys.min() >= 16 else "top" if ys.max() < 16 else None
        horizontal = "right" if xs.min() >= 16 else "left" if xs.max() < 16 else None
        assert f"{vertical} {horizontal}" == attrs["position"], sample["id"]
        assert nearest_colour(np.asarray(image)[mask].mean(axis=0)) == attrs["colour"], sample["id"]
        assert classify_shape(mask) == attrs["shape"], sample["id"]
        assert mask.sum() >= 40, f"{sample['id']}: shape too small to learn at 32 px"


def test_videos_move_in_the_stated_direction(default_dataset):
    root, splits = default_dataset
    videos = [s for s in splits["val"] + splits["test"] if s["meta"]["modality"] == "video"]
    assert len(videos) >= 50
    unit = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}
    for sample in videos:
        attrs = sample["meta"]["attributes"]
        frames = [Image.open(root / p) for p in sample["videos"][0]]
        assert len(frames) == synth.VIDEO_FRAMES and sample["video_fps"] == [synth.VIDEO_FPS]
        masks = [shape_mask(frame) for frame in frames]
        centroids = np.array([[np.nonzero(m)[1].mean(), np.nonzero(m)[0].mean()] for m in masks])
        steps = np.diff(centroids, axis=0)
        along = steps @ np.array(unit[attrs["direction"]])
        across = steps @ np.array(unit[attrs["direction"]][::-1])
        assert (along >= 3).all() and np.allclose(across, 0), f"{sample['id']}: steps {steps.tolist()}"
        assert all(classify_shape(m) == attrs["shape"] for m in masks), sample["id"]
        expected = attrs["direction"] if sample["meta"]["task"] == "video_direction" else attrs["shape"]
        assert sample["meta"]["answer"] == expected
        if sample["meta"]["task"] == "video_direction":
            assert attrs["shape"] in sample["messages"][0]["content"]


def test_image_size_option_and_cli(tmp_path, capsys):
    assert synth.main([str(tmp_path), "--num", "22", "--eval-num", "0", "--image-size", "48",
                       "--splits", "train,val", "--seed", "2"]) == 0
    samples = read_manifest(tmp_path / "train.jsonl")
    assert len(samples) == 22 and read_manifest(tmp_path / "val.jsonl") == []
    image = Image.open(tmp_path / next(s for s in samples if "images" in s)["images"][0])
    assert image.size == (48, 48)
    assert "train: 22 samples" in capsys.readouterr().out
    with pytest.raises(ValueError, match="image_size"):
        synth.generate(tmp_path / "x", image_size=20)
    with pytest.raises(ValueError, match="unknown or no tasks"):
        synth.generate(tmp_path / "y", tasks=["image_color"])


def test_tones_fall_in_distinct_log_mel_bins():
    """Learnability: every tone peaks in its own 80-bin Whisper log-mel bin, >= 4 bins from any other."""
    from transformers import WhisperFeatureExtractor

    extractor = WhisperFeatureExtractor(feature_size=80, sampling_rate=16000, chunk_length=1)
    t = np.arange(1600) / 16000
    peaks = []
    for freq in synth_media.LOW_TONES_HZ + synth_media.HIGH_TONES_HZ:
        features = extractor(0.3 * np.sin(2 * np.pi * freq * t), sampling_rate=16000, return_tensors="np")
        peaks.append(int(features.input_features[0][:, :8].mean(axis=1).argmax()))
    assert np.diff(peaks).min() >= 4, peaks
    assert len(set(synth_media.DIGIT_TONES.values())) == 10
