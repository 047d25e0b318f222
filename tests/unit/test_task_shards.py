"""Pieces the tiny-omni recipe relies on: shards by task, several shard folders as one source, text-only samples."""

from __future__ import annotations

import json

import pytest

from omni_moe.data.reader import ShardDataset, resolve_shards
from omni_moe.data.schema import strip_media
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


def test_strip_media_puts_each_media_description_in_its_markers_place():
    sample = {"id": "x", "messages": [{"role": "user", "content": "<image>\nCompare with <audio>."},
                                       {"role": "assistant", "content": "same"}],
              "images": ["a.png"], "audios": ["b.wav"],
              "meta": {"media_text": ["a red circle at the top left", "the digits 0 2"]}}
    text = strip_media(sample)
    assert text["messages"][0]["content"] == "a red circle at the top left Compare with the digits 0 2 ."
    assert text["meta"]["media_text"] == ["a red circle at the top left", "the digits 0 2"]  # not consumed


def test_synthetic_media_samples_describe_their_media_and_the_shards_keep_it(tmp_path):
    from omni_moe.data.synth import describe_media

    out = tmp_path / "synth"
    assert main(["data", "synth", str(out), "--num", "22", "--eval-num", "11", "--shards-by-task"]) == 0
    seen = set()
    for folder in (f for f in (out / "shards" / "train").iterdir() if (f / "index.json").is_file()):
        for sample in ShardDataset(str(folder), rank=0, world_size=1, shuffle=False):
            meta = sample["meta"]
            if meta["modality"] == "text":
                assert "media_text" not in meta and strip_media(sample)["messages"] == sample["messages"]
                continue
            attributes, (described,) = meta["attributes"], meta["media_text"]
            assert described == describe_media(meta["modality"], attributes)
            # every attribute the questions ask about is in the words (so the text alone answers them)
            for key in ("colour", "shape", "position", "direction", "digits"):
                if key in attributes:
                    assert str(attributes[key]) in described
            stripped = strip_media(sample)["messages"][0]["content"]
            assert stripped.startswith(described) and "<" not in stripped
            seen.add(meta["modality"])
    assert seen == {"image", "video", "audio"}


def test_omni_train_keeps_a_finished_synthetic_dataset_and_refuses_to_remake_it_in_place(tmp_path):
    from omni_moe.data.synth import SYNTH_VERSION
    from omni_moe.training.recipe import load_recipe
    from omni_moe.training.run_folder import READY_FILE, SynthDataConflict, prepare_synth_data
    from omni_moe.training.run_lock import RunLock, RunLockHeld

    out = tmp_path / "synth"
    recipe = load_recipe("recipes/tiny_omni.yaml", [f"data.synth.out={out}", "data.synth.num=22",
                                                    "data.synth.eval_num=11", "data.synth.max_samples_per_shard=1"])
    prepare_synth_data(recipe)
    ready = json.loads((out / READY_FILE).read_text())
    assert ready["synth_version"] == SYNTH_VERSION and "--num 22" in ready["command"]
    # 2 samples per task, one per shard: every task folder can feed 2 ranks
    assert len(json.loads((out / "shards" / "train" / "video_shape" / "index.json").read_text())["shards"]) == 2
    manifest = out / "train.jsonl"
    made, lines = manifest.stat().st_mtime_ns, manifest.read_text()
    prepare_synth_data(recipe)  # finished with the same command and version: kept
    assert manifest.stat().st_mtime_ns == made
    # finished by another generator version or command: another run may be training on it, so it is not remade
    (out / READY_FILE).write_text(json.dumps({"command": ready["command"]}))
    with pytest.raises(SynthDataConflict, match="holds a finished synthetic dataset"):
        prepare_synth_data(recipe)
    assert manifest.stat().st_mtime_ns == made and manifest.read_text() == lines
    # half-made (no READY.json): remade, unless another run is making it right now
    (out / READY_FILE).unlink()
    with RunLock(out), pytest.raises(RunLockHeld, match="in use by another run"):
        prepare_synth_data(recipe)
    prepare_synth_data(recipe)
    assert json.loads((out / READY_FILE).read_text()) == ready and len(manifest.read_text().splitlines()) == 22
