"""Shard writer (reproducibility, index, layout), reader decoding, shuffling and exact resume."""

import io
import json
import tarfile

import numpy as np
import pytest
from PIL import Image

from omni_moe.data.loader import ResumableLoader
from omni_moe.data.media import DEFAULT_LIMITS, _read_with_soundfile, _read_with_wave, decode_audio, resample_audio
from omni_moe.data.mixing import MixedShardDataset
from omni_moe.data.reader import ShardDataset, assign_shards
from omni_moe.data.shards import build_shards, load_index, shard_key
from omni_moe.data.testing import image_bytes, make_manifest, sine, wav_bytes, write


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("ds")
    manifest = make_manifest(root / "media", n_text=6, n_image=6, n_audio=6, n_video=6)
    with open(manifest, "a") as handle:  # one reject, to see it in the index
        handle.write(json.dumps({"id": "bad-missing", "images": ["images/none.png"], "messages": [
            {"role": "user", "content": "<image>"}, {"role": "assistant", "content": "x"}]}) + "\n")
    index = build_shards(manifest, root / "media", root / "shards", max_samples_per_shard=3, progress=False)
    return root, manifest, index


def ids_of(batches):
    return [[s["id"] for s in batch] for batch in batches]


def test_rebuild_is_byte_identical(built, tmp_path):
    root, manifest, index = built
    again = build_shards(manifest, root / "media", tmp_path / "again", max_samples_per_shard=3, progress=False)
    assert again == index
    for shard in index["shards"]:
        assert (root / "shards" / shard["name"]).read_bytes() == (tmp_path / "again" / shard["name"]).read_bytes()
    assert (root / "shards" / "index.json").read_bytes() == (tmp_path / "again" / "index.json").read_bytes()


def test_index_contents(built):
    root, _, index = built
    assert load_index(root / "shards") == index
    assert index["num_samples"] == 24 and len(index["shards"]) == 8
    assert [s["samples"] for s in index["shards"]] == [3] * 8
    assert all(s["bytes"] == (root / "shards" / s["name"]).stat().st_size for s in index["shards"])
    assert index["modalities"] == {"text": 6, "image": 6, "video": 6, "audio": 6}
    assert index["media"] == {"images": 6, "videos": 6, "video_frames": 12, "audios": 6}
    assert index["length"]["unit"] == "chars"
    assert sum(b["count"] for b in index["length"]["histogram"]) == 24
    assert index["counters"] == {"seen": 25, "accepted": 24, "dropped": {"missing_media": 1}}
    assert index["rejected"] == [{"where": "manifest.jsonl:25", "id": "bad-missing", "reason": "missing_media",
                                  "message": "images[0] 'images/none.png' does not exist under the media root"}]


def test_shard_member_layout_and_fixed_metadata(built):
    root, _, index = built
    members = {}
    for shard in index["shards"]:
        with tarfile.open(root / "shards" / shard["name"]) as tar:
            for info in tar.getmembers():
                assert (info.mtime, info.uid, info.gid, info.mode) == (0, 0, 0, 0o444)
                members[info.name] = tar.extractfile(info).read()
    assert {"s-video-0001.json", "s-video-0001.video0.frame000.png", "s-video-0001.video0.frame001.png",
            "s-image-0002.image0.png", "s-audio-0003.audio0.wav", "s-text-0004.json"} <= set(members)
    stored = json.loads(members["s-video-0001.json"])
    assert stored["videos"] == [["video0.frame000.png", "video0.frame001.png"]] and stored["video_fps"] == [2.0]
    assert members["s-image-0002.image0.png"] == (root / "media/images/0002.png").read_bytes()  # bytes as-is


def test_byte_limit_rolls_shards_and_stale_shards_are_removed(built, tmp_path):
    root, manifest, _ = built
    small = build_shards(manifest, root / "media", tmp_path, max_samples_per_shard=100,
                         max_shard_bytes=16 * 1024, progress=False)
    assert len(small["shards"]) > 1 and all(s["bytes"] <= 16 * 1024 for s in small["shards"])
    big = build_shards(manifest, root / "media", tmp_path, max_samples_per_shard=100, progress=False)
    assert [p.name for p in sorted(tmp_path.glob("shard-*.tar"))] == ["shard-000000.tar"] == \
        [s["name"] for s in big["shards"]]


def test_shard_key_is_tar_and_webdataset_safe():
    assert shard_key("train-image-000017") == "train-image-000017"
    odd = shard_key("a/b.c d")
    assert "." not in odd and "/" not in odd and odd.startswith("a_b_c_d_") and odd != shard_key("a_b_c_d")


def test_reader_decodes_each_media_kind(built):
    root, _, _ = built
    samples = {s["id"]: s for s in ShardDataset(root / "shards", rank=0, world_size=1, audio_sampling_rate=16000)}
    assert len(samples) == 24
    image = samples["s-image-0002"]["images"][0]
    expected = np.asarray(Image.open(io.BytesIO((root / "media/images/0002.png").read_bytes())).convert("RGB"))
    assert image.mode == "RGB" and np.array_equal(np.asarray(image), expected)
    video = samples["s-video-0001"]
    assert [f.getpixel((0, 0)) for f in video["videos"][0]] == [(0, 0, 1), (0, 40, 1)]
    assert video["video_fps"] == [2.0] and video["meta"]["modality"] == "video"
    audio = samples["s-audio-0003"]
    assert audio["audio_sampling_rates"] == [16000] and audio["audios"][0].dtype == np.float32
    assert audio["audios"][0].shape == (800,)  # 0.05 s at 8 kHz resampled to 16 kHz
    text = samples["s-text-0004"]
    assert text["images"] == text["videos"] == text["audios"] == [] and text["messages"][1]["content"] == "word4"
    assert samples["s-image-0002"]["messages"][0] == {"role": "system", "content": "be brief"}


def test_audio_resampling_and_stereo_to_mono():
    rate, target = 8000, 16000
    left, right = sine(250, rate, 0.1), 0.5 * sine(250, rate, 0.1)  # 25 whole periods: exactly periodic
    data = wav_bytes([left, right], rate)
    mono, out_rate = decode_audio(data, "stereo.wav", target_rate=target)
    assert out_rate == target and mono.shape == (1600,)
    np.testing.assert_allclose(mono, 0.75 * sine(250, target, 0.1), atol=2e-4)
    native, native_rate = decode_audio(data, "stereo.wav", target_rate=None)
    assert native_rate == rate and np.allclose(native, 0.75 * left, atol=1e-4)
    down = resample_audio(sine(100, 16000, 0.5), 16000, 8000)
    np.testing.assert_allclose(down, sine(100, 8000, 0.5), atol=1e-4)
    # The standard-library fallback reads the same PCM values as soundfile.
    sf_frames, sf_rate = _read_with_soundfile(data, "w", DEFAULT_LIMITS)
    wave_frames, wave_rate = _read_with_wave(data, "w", DEFAULT_LIMITS)
    assert sf_rate == wave_rate == rate and np.array_equal(sf_frames, wave_frames)


def test_llava_manifest_builds_and_reads_back(tmp_path):
    write(tmp_path / "media/coco/1.jpg", image_bytes((0, 200, 0), fmt="JPEG"))
    write(tmp_path / "media/speech/1.wav", wav_bytes([sine(300, 16000, 0.02)], 16000))
    records = [{"id": 1, "image": "coco/1.jpg", "conversations": [
                   {"from": "human", "value": "<image>\nColour?"}, {"from": "gpt", "value": "green"}]},
               {"id": "sp-1", "voice": ["speech/1.wav"], "conversations": [
                   {"from": "human", "value": "<audio>\nSay it."}, {"from": "gpt", "value": "ok"}]}]
    (tmp_path / "llava.json").write_text(json.dumps(records))
    index = build_shards(tmp_path / "llava.json", tmp_path / "media", tmp_path / "out", progress=False)
    assert index["num_samples"] == 2 and index["modalities"]["image"] == index["modalities"]["audio"] == 1
    samples = {s["id"]: s for s in ShardDataset(tmp_path / "out", rank=0, world_size=1)}
    assert samples["1"]["messages"] == [{"role": "user", "content": "<image>\nColour?"},
                                        {"role": "assistant", "content": "green"}]
    assert samples["1"]["images"][0].getpixel((3, 3))[1] > 150
    assert samples["sp-1"]["audios"][0].shape == (320,) and samples["sp-1"]["meta"]["source_format"] == "llava"


def test_shuffle_is_deterministic_per_seed_and_epoch(built):
    root, _, _ = built

    def order(seed, epoch):
        dataset = ShardDataset(root / "shards", rank=0, world_size=1, seed=seed, shuffle_buffer=8)
        dataset.set_epoch(epoch)
        return [s["id"] for s in dataset]

    first = order(3, 0)
    assert order(3, 0) == first and sorted(first) == sorted(order(3, 1))
    assert order(3, 1) != first and order(4, 0) != first


def test_shard_assignment_is_disjoint_and_complete():
    shards = [f"s{i}" for i in range(10)]
    seen = [s for rank in range(2) for worker in range(2) for s in assign_shards(
        shards, seed=0, epoch=5, rank=rank, world_size=2, worker=worker, num_workers=2)]
    assert sorted(seen) == sorted(shards)
    with pytest.raises(ValueError, match="3 shard\\(s\\) cannot feed 2 rank\\(s\\) x 2 dataloader worker"):
        assign_shards(shards[:3], seed=0, epoch=0, rank=0, world_size=2, worker=0, num_workers=2)


def make_loader(shard_dir, num_workers, max_length=None, **kw):
    dataset = ShardDataset(shard_dir, rank=0, world_size=1, seed=11, shuffle_buffer=4, max_length=max_length)
    return ResumableLoader(dataset, batch_size=3, num_workers=num_workers, **kw)


@pytest.fixture(scope="module")
def uneven(built, tmp_path_factory):
    """5 shards of 5,5,5,5,4: with 2 workers one runs out first; max_length=30 drops some samples at read time."""
    root, manifest, _ = built
    out = tmp_path_factory.mktemp("uneven")
    build_shards(manifest, root / "media", out, max_samples_per_shard=5, progress=False)
    return out


@pytest.mark.parametrize("num_workers", [0, 2])
@pytest.mark.parametrize("layout", ["even", "uneven_with_drops"])
def test_resume_gives_the_batches_of_the_uninterrupted_run(built, uneven, num_workers, layout):
    shard_dir, max_length = (built[0] / "shards", None) if layout == "even" else (uneven, 30)
    straight = make_loader(shard_dir, num_workers, max_length)
    epoch0, epoch1 = ids_of(straight), ids_of(straight)
    assert sorted(sum(epoch0, [])) == sorted(sum(epoch1, [])) and epoch0 != epoch1
    total = straight.counters
    assert total.seen == 48 and (total.dropped.get("too_long", 0) > 0) == (max_length is not None)

    for stop in (1, 4, len(epoch0) - 1, len(epoch0)):  # early, odd worker turn, near and at the end
        first = make_loader(shard_dir, num_workers, max_length)
        taken = []
        for batch in first:
            taken.append([s["id"] for s in batch])
            if len(taken) == stop:
                break
        state = json.loads(json.dumps(first.state_dict()))  # must survive a JSON round trip
        resumed = make_loader(shard_dir, num_workers, max_length)
        resumed.load_state_dict(state)
        rest = ids_of(resumed)
        assert taken + rest == epoch0, f"stop={stop}"
        assert ids_of(resumed) == epoch1
        assert resumed.counters == total


def test_fixed_epoch_length_and_state_mismatch(built):
    root, _, _ = built
    loader = make_loader(root / "shards", 0, max_batches_per_epoch=2)
    assert len(ids_of(loader)) == 2 and loader.epoch == 1
    with pytest.raises(ValueError, match="num_workers: saved 0 != now 2"):
        make_loader(root / "shards", 2).load_state_dict(loader.state_dict())


@pytest.fixture(scope="module")
def mix_sources(built, tmp_path_factory):
    root = tmp_path_factory.mktemp("mix")
    manifest = make_manifest(root / "media", n_text=3, n_image=3, n_audio=3, n_video=3, prefix="b")
    build_shards(manifest, root / "media", root / "shards", max_samples_per_shard=3, progress=False)
    return {"a": built[0] / "shards", "b": root / "shards"}


def make_mix(sources, epoch=0, **kw):
    dataset = MixedShardDataset(sources, {"a": 1, "b": 3}, samples_per_epoch=80, rank=0, world_size=1, seed=2,
                                shuffle_buffer=4, **kw)
    dataset.set_epoch(epoch)
    return dataset


def test_mixing_follows_the_weights_and_passes_over_each_source(mix_sources):
    samples = list(make_mix(mix_sources))
    sources = [s["source"] for s in samples]
    assert len(samples) == 80 and 45 <= sources.count("b") <= 75  # expected 60 of 80 (binomial sd ~3.9)
    b_ids = [s["id"] for s in samples if s["source"] == "b"]
    assert all(i.startswith("b-") for i in b_ids)
    assert sorted(b_ids[:12]) == sorted(set(b_ids[:12])) and len(set(b_ids)) == 12  # each pass: every sample once
    assert [s["id"] for s in make_mix(mix_sources)] == [s["id"] for s in samples]
    assert [s["id"] for s in make_mix(mix_sources, epoch=1)] != [s["id"] for s in samples]


def test_mixing_resumes_exactly_with_workers(mix_sources):
    def loader():
        return ResumableLoader(make_mix(mix_sources), batch_size=4, num_workers=2)

    epoch0 = ids_of(loader())
    first, taken = loader(), []
    for batch in first:
        taken.append([s["id"] for s in batch])
        if len(taken) == 7:
            break
    resumed = loader()
    resumed.load_state_dict(first.state_dict())
    assert taken + ids_of(resumed) == epoch0
    other = MixedShardDataset(mix_sources, {"a": 1, "b": 1}, samples_per_epoch=80, rank=0, world_size=1, seed=2,
                              shuffle_buffer=4)
    with pytest.raises(ValueError, match="dataset: saved"):  # changed weights: no silent drift
        ResumableLoader(other, batch_size=4, num_workers=2).load_state_dict(first.state_dict())
    with pytest.raises(ValueError, match="weights must be positive"):
        MixedShardDataset(mix_sources, {"a": 1, "b": 0}, samples_per_epoch=8)
