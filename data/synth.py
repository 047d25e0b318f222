"""The synthetic omni dataset: real media files plus conversations a tiny model can learn.

`generate(out_dir, seed=0, num=4400)` writes, deterministically and in a few seconds:

    out_dir/train.jsonl, val.jsonl, test.jsonl      canonical samples (one JSON object a line)
    out_dir/images/<split>/<index>.png              32x32 RGB: one shape, colour, quadrant
    out_dir/videos/<split>/<index>/f0..f3.png       4 frames of a shape moving left/right/up/down
    out_dir/audio/<split>/<index>.wav               16 kHz mono 16-bit DTMF-like digit tones (< 1 s)

Media paths in the manifests are relative to `out_dir` (the media root for the shard writer,
`omni_moe.data.shards.build_shards(manifest, media_root=out_dir, ...)`, which this module does not call).

Sizes: `num` is the number of TRAIN samples in total; every other split gets `eval_num`
(default `num // 10`); a mapping `splits={"train": n, ...}` sets each count directly. Tasks are
mixed round-robin (sample i has task `tasks[i % len(tasks)]`), so every task gets the same share.

Determinism: each split draws from its own seed `seed * 1000 + SPLIT_INDEX[split]`, and each
sample from `(split_seed, index)` alone, so a sample's content depends on nothing but its seed,
split and index (generating only "test" gives the same test files as generating all splits).
Attribute combinations (shape x colour x position, shape x direction, digit count) are drawn
stratified: each task cycles through a fresh permutation of all combinations, so answers are
balanced and every combination appears once `num` covers a cycle.

Design choices that keep it learnable, calibrated with a plain 1.9 M-parameter dense model trained jointly on all
tasks (every task reached >= 0.90 held-out exact match within ~920 steps of 64 samples): a 32 px canvas, shapes
~0.34-0.41 of the canvas inside one quadrant (shape is the hardest task; enlarging the shapes 1.25x made it easy),
six well-separated hues, DTMF-like tone pairs spread far apart on the mel scale, clips within one 1 s
Whisper chunk, short exact answers. Rendering the media is `omni_moe.data.synth_media`.

Evaluation: `audio_transcribe` samples carry `meta.metric = "wer"` (`omni_moe.data.schema`), so eval reports their word
error rate next to exact match and token F1 (`omni_moe.training.scoring`).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from .schema import MARKERS, WER_METRIC
from .synth_media import (
    COLOURS,
    SAMPLE_RATE,
    SHAPES,
    render_image,
    render_video,
    save_png,
    synth_digit_audio,
    write_wav,
)

DATASET_NAME = "synth"
# bumped whenever the samples a seed gives change (2: meta.media_text; 3: meta.metric), so a dataset made by older
# code is remade
SYNTH_VERSION = 3
SPLIT_INDEX = {"train": 0, "val": 1, "test": 2}
DEFAULT_NUM = 4400  # 400 train samples per task
DEFAULT_IMAGE_SIZE = 32

COLOURS_LIST = tuple(COLOURS)
POSITIONS = ("top left", "top right", "bottom left", "bottom right")
DIRECTIONS = ("left", "right", "up", "down")
COLOUR_JITTER = 18  # per channel, so images never repeat exactly and colour is a range, not a value
MAX_BACKGROUND = 40  # dark grey background level in [0, MAX_BACKGROUND]

MAX_CLIP_SECONDS = 1.0  # tiny Whisper configs use 1 s chunks
DIGIT_COUNTS = (2, 3, 4)
TONE_SECONDS = (0.12, 0.16)
GAP_SECONDS = (0.06, 0.09)
LEAD_SECONDS = (0.02, 0.05)
TAIL_SECONDS = 0.02

VIDEO_FRAMES = 4
VIDEO_FPS = 2.0

LETTERS = "abcdefghijklmnopqrstuvwxyz"


@dataclass(frozen=True)
class SynthTask:
    """A task: its modality, the question phrasings (`str.format` templates) and the `meta.metric` its samples
    declare (None: none, exact match and token F1 are reported for every sample anyway)."""

    name: str
    modality: str
    phrasings: tuple[str, ...]
    metric: str | None = None


def _task(name: str, modality: str, *phrasings: str, metric: str | None = None) -> tuple[str, SynthTask]:
    return name, SynthTask(name, modality, phrasings, metric)


TASKS: dict[str, SynthTask] = dict([
    _task("image_caption", "image", "Describe the image.", "What is in the picture?",
          "Give a short caption for this image.", "Caption the image."),
    _task("image_colour", "image", "What colour is the shape?", "Which colour is the shape?",
          "What is the colour of the shape?"),
    _task("image_shape", "image", "What shape is this?", "Which shape is shown?",
          "What kind of shape is in the image?"),
    _task("image_position", "image", "Where is the shape?", "In which corner is the shape?",
          "Where in the image is the shape located?"),
    _task("audio_transcribe", "audio", "Transcribe the digits.", "What digits are played?",
          "Which digits do you hear?", metric=WER_METRIC),
    _task("audio_count", "audio", "How many beeps?", "How many beeps are there?",
          "How many tones do you hear?"),
    _task("video_direction", "video", "Which way does the {shape} move?",
          "In which direction is the {shape} moving?", "Where does the {shape} go?"),
    _task("video_shape", "video", "What shape is moving?", "Which shape moves in the video?",
          "What kind of shape is in the video?"),
    _task("text_copy", "text", "Repeat: {seq}", "Copy this: {seq}", "Say exactly this: {seq}"),
    _task("text_reverse", "text", "Reverse: {seq}", "Write this backwards: {seq}",
          "Reverse the order: {seq}"),
    _task("text_add", "text", "What is {a} plus {b}?", "Add {a} and {b}.", "{a} + {b} = ?",
          "What is the sum of {a} and {b}?"),
])

_IMAGE_COMBOS = [(s, c, p) for s in SHAPES for c in COLOURS for p in POSITIONS]
_VIDEO_COMBOS = [(s, d) for s in SHAPES for d in DIRECTIONS]
_STRATA_STREAM, _SAMPLE_STREAM = 1, 2  # separate SeedSequence namespaces per split


def split_seed(seed: int, split: str) -> int:
    """The split's own seed; distinct for every (seed >= 0, split) pair."""
    if split not in SPLIT_INDEX:
        raise ValueError(f"unknown split {split!r}; expected one of {sorted(SPLIT_INDEX)}")
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    return seed * 1000 + SPLIT_INDEX[split]


# ----------------------------------------------------------------------------- planning

def _jittered_colour(rng: np.random.Generator, name: str) -> tuple[int, int, int]:
    base = np.array(COLOURS[name])
    return tuple(int(v) for v in np.clip(base + rng.integers(-COLOUR_JITTER, COLOUR_JITTER + 1, 3), 0, 255))


def _stratum(split_rng_seed: int, task_index: int, k: int, combos: Sequence) -> Any:
    """The k-th sample of a task takes entry k of a per-cycle random permutation of `combos`."""
    cycle, offset = divmod(k, len(combos))
    perm = np.random.default_rng([split_rng_seed, _STRATA_STREAM, task_index, cycle]).permutation(len(combos))
    return combos[int(perm[offset])]


def _plan_image(rng: np.random.Generator, combo, image_size: int) -> tuple[dict, dict]:
    shape, colour, position = combo
    half = image_size // 2
    margin = max(1, round(image_size / 32))
    size = int(rng.integers(round(0.34 * image_size), round(0.41 * image_size) + 1))
    qx = half if position.endswith("right") else 0
    qy = half if position.startswith("bottom") else 0
    x0 = qx + int(rng.integers(margin, half - margin - size + 1))
    y0 = qy + int(rng.integers(margin, half - margin - size + 1))
    render = {"shape": shape, "x0": x0, "y0": y0, "size": size, "rgb": _jittered_colour(rng, colour),
              "background": int(rng.integers(0, MAX_BACKGROUND + 1))}
    return {"shape": shape, "colour": colour, "position": position}, render


def _plan_video(rng: np.random.Generator, combo, image_size: int) -> tuple[dict, dict]:
    shape, direction = combo
    colour = COLOURS_LIST[int(rng.integers(len(COLOURS_LIST)))]
    margin = max(1, round(image_size / 32))
    size = int(rng.integers(round(0.28 * image_size), round(0.34 * image_size) + 1))
    step = int(rng.integers(round(0.12 * image_size), round(0.15 * image_size) + 1))
    travel = step * (VIDEO_FRAMES - 1)
    far = image_size - margin - size  # largest top-left coordinate that keeps the shape inside
    sign = 1 if direction in ("right", "down") else -1
    start = int(rng.integers(margin, far - travel + 1)) + (0 if sign > 0 else travel)
    across = int(rng.integers(margin, far + 1))
    along = [start + sign * step * f for f in range(VIDEO_FRAMES)]
    path = [(a, across) if direction in ("left", "right") else (across, a) for a in along]
    render = {"shape": shape, "size": size, "path": path, "rgb": _jittered_colour(rng, colour),
              "background": int(rng.integers(0, MAX_BACKGROUND + 1))}
    return {"shape": shape, "colour": colour, "direction": direction}, render


def _plan_audio(rng: np.random.Generator, count: int) -> tuple[dict, dict]:
    digits = [str(int(d)) for d in rng.integers(0, 10, count)]
    cursor = int(rng.uniform(*LEAD_SECONDS) * SAMPLE_RATE)
    tones = []
    for i, digit in enumerate(digits):
        if i:
            cursor += int(rng.uniform(*GAP_SECONDS) * SAMPLE_RATE)
        length = int(rng.uniform(*TONE_SECONDS) * SAMPLE_RATE)
        tones.append({"digit": digit, "start": cursor, "length": length,
                      "amplitude": float(rng.uniform(0.25, 0.45)),
                      "phase": [float(p) for p in rng.uniform(0, 2 * np.pi, 2)]})
        cursor += length
    num_samples = cursor + int(TAIL_SECONDS * SAMPLE_RATE)
    assert num_samples <= MAX_CLIP_SECONDS * SAMPLE_RATE, "timing constants exceed the 1 s clip budget"
    render = {"tones": tones, "num_samples": num_samples, "noise_seed": int(rng.integers(2**31))}
    return {"digits": " ".join(digits), "count": count}, render



@dataclass
class PlannedSample:
    """Everything about one sample before its media are written."""

    index: int
    task: str
    question: str
    answer: str
    attributes: dict
    render: dict


def plan_sample(seed: int, split: str, index: int, tasks: Sequence[str], image_size: int) -> PlannedSample:
    """The content of sample `index` of `split`: a pure function of its arguments."""
    base = split_seed(seed, split)
    task_index = index % len(tasks)
    name, k = tasks[task_index], index // len(tasks)
    spec = TASKS[name]
    rng = np.random.default_rng([base, _SAMPLE_STREAM, index])
    phrasing = spec.phrasings[int(rng.integers(len(spec.phrasings)))]
    render: dict = {}
    if spec.modality == "image":
        attrs, render = _plan_image(rng, _stratum(base, task_index, k, _IMAGE_COMBOS), image_size)
        answer = {"image_caption": describe_media("image", attrs),
                  "image_colour": attrs["colour"], "image_shape": attrs["shape"],
                  "image_position": attrs["position"]}[name]
    elif spec.modality == "video":
        attrs, render = _plan_video(rng, _stratum(base, task_index, k, _VIDEO_COMBOS), image_size)
        answer = attrs["direction"] if name == "video_direction" else attrs["shape"]
        phrasing = phrasing.format(shape=attrs["shape"])
    elif spec.modality == "audio":
        attrs, render = _plan_audio(rng, _stratum(base, task_index, k, DIGIT_COUNTS))
        answer = attrs["digits"] if name == "audio_transcribe" else str(attrs["count"])
    elif name in ("text_copy", "text_reverse"):
        letters = [LETTERS[int(i)] for i in rng.integers(0, len(LETTERS), int(rng.integers(2, 6)))]
        attrs = {"seq": " ".join(letters)}
        phrasing = phrasing.format(seq=attrs["seq"])
        answer = attrs["seq"] if name == "text_copy" else " ".join(reversed(letters))
    elif name == "text_add":
        a, b = (int(v) for v in rng.integers(0, 10, 2))
        attrs = {"a": a, "b": b}
        phrasing, answer = phrasing.format(a=a, b=b), str(a + b)
    else:
        raise ValueError(f"task {name!r} has no generator")
    return PlannedSample(index, name, phrasing, answer, attrs, render)


# ----------------------------------------------------------------------------- writing

def _write_media(plan: PlannedSample, split: str, out_dir: Path, image_size: int) -> dict:
    """Write the sample's media files; return the canonical media fields (paths relative to out_dir)."""
    modality = TASKS[plan.task].modality
    stem = f"{plan.index:06d}"
    if modality == "image":
        rel = f"images/{split}/{stem}.png"
        save_png(render_image(plan.render, image_size), out_dir / rel)
        return {"images": [rel]}
    if modality == "video":
        frame_dir = out_dir / "videos" / split / stem
        frame_dir.mkdir(exist_ok=True)
        rels = []
        for f, frame in enumerate(render_video(plan.render, image_size)):
            rels.append(f"videos/{split}/{stem}/f{f}.png")
            save_png(frame, out_dir / rels[-1])
        return {"videos": [rels], "video_fps": [VIDEO_FPS]}
    if modality == "audio":
        rel = f"audio/{split}/{stem}.wav"
        write_wav(out_dir / rel, synth_digit_audio(plan.render))
        return {"audios": [rel]}
    return {}


def to_sample(plan: PlannedSample, split: str, media: Mapping[str, Any]) -> dict:
    """The canonical sample dict (see docs/architecture.md and the data format)."""
    task = TASKS[plan.task]
    modality, marker = task.modality, MARKERS.get(task.modality)
    user = f"{marker}\n{plan.question}" if marker else plan.question
    return {
        "id": f"{split}-{modality}-{plan.index:06d}",
        "messages": [{"role": "user", "content": user}, {"role": "assistant", "content": plan.answer}],
        **media,
        "meta": {"task": plan.task, "modality": modality, "split": split, "dataset": DATASET_NAME,
                 "answer": plan.answer, "attributes": plan.attributes,
                 **({"media_text": [describe_media(modality, plan.attributes)]} if marker else {}),
                 **({"metric": task.metric} if task.metric else {})},
    }


def describe_media(modality: str, attributes: Mapping[str, Any]) -> str:
    """What a sample's medium shows, in words (`meta.media_text`; `omni_moe.data.schema.strip_media` puts it in the marker's
    place for text-only training)."""
    if modality == "image":
        return f"a {attributes['colour']} {attributes['shape']} at the {attributes['position']}"
    if modality == "video":
        return f"a {attributes['colour']} {attributes['shape']} moving {attributes['direction']}"
    if modality == "audio":
        return f"the digits {attributes['digits']}"
    raise ValueError(f"describe_media: no description for modality {modality!r}")


def _resolve_splits(splits, num: int, eval_num: int | None, tasks: Sequence[str]) -> dict[str, int]:
    if isinstance(splits, Mapping):
        counts = {name: int(n) for name, n in splits.items()}
    else:
        eval_count = max(num // 10, len(tasks)) if eval_num is None else eval_num
        counts = {name: (num if name == "train" else eval_count) for name in splits}
    for name, n in counts.items():
        split_seed(0, name)  # validates the name
        if n < 0:
            raise ValueError(f"split {name!r}: sample count must be >= 0, got {n}")
    return counts


def generate(out_dir: str | os.PathLike, seed: int = 0, num: int = DEFAULT_NUM,
             splits: Sequence[str] | Mapping[str, int] = ("train", "val", "test"), *,
             eval_num: int | None = None, image_size: int = DEFAULT_IMAGE_SIZE,
             tasks: Sequence[str] | None = None, overwrite: bool = False,
             progress: bool = False) -> dict[str, Path]:
    """Write media and one manifest per split under `out_dir`; return {split: manifest path}.

    `num`: train samples in total (all tasks, round-robin). `eval_num`: samples of each other
    split (default `max(num // 10, len(tasks))`). A mapping `splits` gives every count directly.
    `tasks`: a subset of `TASKS` (default all). An existing split is replaced only with
    `overwrite=True` (its manifest and its own media folders are deleted first).
    """
    tasks = list(TASKS) if tasks is None else list(tasks)
    unknown = [t for t in tasks if t not in TASKS]
    if unknown or not tasks:
        raise ValueError(f"unknown or no tasks {unknown}; expected a subset of {list(TASKS)}")
    if image_size < 24 or image_size % 2:
        raise ValueError(f"image_size must be even and >= 24 (a shape must fit in a quadrant), got {image_size}")
    counts = _resolve_splits(splits, num, eval_num, tasks)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    manifests: dict[str, Path] = {}
    for split, count in counts.items():
        manifest = out_dir / f"{split}.jsonl"
        media_dirs = [out_dir / kind / split for kind in ("images", "videos", "audio")]
        if manifest.exists() or any(d.exists() for d in media_dirs):
            if not overwrite:
                raise FileExistsError(f"{manifest} (or its media folders) already exists; pass overwrite=True "
                                      f"(--overwrite) to regenerate split {split!r}")
            manifest.unlink(missing_ok=True)
            for d in media_dirs:
                shutil.rmtree(d, ignore_errors=True)
        for d in media_dirs:
            d.mkdir(parents=True)
        rows = range(count)
        if progress:
            from tqdm import tqdm

            rows = tqdm(rows, desc=f"synth {split}", unit="sample")
        lines = []
        for index in rows:
            plan = plan_sample(seed, split, index, tasks, image_size)
            sample = to_sample(plan, split, _write_media(plan, split, out_dir, image_size))
            lines.append(json.dumps(sample, ensure_ascii=False))
        # Manifest last and atomically: a crashed run never leaves a manifest naming missing media.
        tmp = manifest.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
        os.replace(tmp, manifest)
        manifests[split] = manifest
    return manifests


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="omni data synth", description=__doc__.split("\n")[0])
    parser.add_argument("out", help="output folder (media root + <split>.jsonl manifests)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--num", type=int, default=DEFAULT_NUM, help="train samples in total")
    parser.add_argument("--eval-num", type=int, default=None, help="samples per val/test split")
    parser.add_argument("--splits", default="train,val,test", help="comma-separated split names")
    parser.add_argument("--tasks", default=None, help=f"comma-separated subset of: {','.join(TASKS)}")
    parser.add_argument("--image-size", type=int, default=DEFAULT_IMAGE_SIZE)
    parser.add_argument("--overwrite", action="store_true")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry (`python -m omni_moe.data.synth OUT`); the `omni` CLI can delegate `omni data synth` here."""
    args = build_parser().parse_args(argv)
    started = time.perf_counter()
    manifests = generate(args.out, seed=args.seed, num=args.num, eval_num=args.eval_num,
                         splits=[s for s in args.splits.split(",") if s], image_size=args.image_size,
                         tasks=args.tasks.split(",") if args.tasks else None, overwrite=args.overwrite,
                         progress=True)
    for split, path in manifests.items():
        with open(path, encoding="utf-8") as handle:
            print(f"{split}: {sum(1 for _ in handle)} samples -> {path}")
    print(f"generated in {time.perf_counter() - started:.1f} s; media root: {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
