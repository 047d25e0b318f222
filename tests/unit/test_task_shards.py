"""Pieces the tiny-omni recipe relies on: shards by task, several shard folders as one source, text-only samples."""

from __future__ import annotations

import json

from data.reader import ShardDataset, resolve_shards
from data.schema import strip_media
from omni.cli import main


def test_synth_shards_by_task_and_a_source_of_several_folders(tmp_path):
    out = tmp_path / "synth"
    assert main(["data", "synth", str(out), "--num", "44", "--eval-num", "11", "--shards-by-task",
                 "--max-samples-per-shard", "2"]) == 0
    train = out / "shards" / "train"
    tasks = sorted(p.name for p in train.iterdir() if (p / "index.json").is_file())
    assert len(tasks) == 11 and "image_caption" in tasks and "text_add" in tasks
    for task in tasks:  # every folder holds its task's 4 samples and nothing else
        index = json.loads((train / task / "index.json").read_text())
        assert index["num_samples"] == 4 and len(index["shards"]) == 2
    folders = [str(train / "audio_count"), str(train / "audio_transcribe")]
    shards = resolve_shards(folders)
    assert len(shards) == 4 and all(s.endswith(".tar") for s in shards)
    samples = list(ShardDataset(folders, rank=0, world_size=1, shuffle=False))
    assert sorted({s["meta"]["task"] for s in samples}) == ["audio_count", "audio_transcribe"] and len(samples) == 8


def test_strip_media_keeps_the_text_and_drops_media():
    sample = {"id": "x", "messages": [{"role": "user", "content": "<image>\nWhat colour is <video> the shape?"},
                                       {"role": "assistant", "content": "red"}],
              "images": ["a.png"], "videos": [["f0.png"]], "video_fps": [2.0], "meta": {"task": "t"}}
    text = strip_media(sample)
    assert text["messages"][0]["content"] == "What colour is the shape?"
    assert text["messages"][1]["content"] == "red" and text["meta"] == {"task": "t"}
    assert not {"images", "videos", "video_fps"} & set(text) and "images" in sample  # the input is not changed
