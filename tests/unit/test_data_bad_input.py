"""Bad input never crashes a run and is never silently replaced: every bad sample is skipped under
its own counter, strict mode raises naming the sample, a drop-rate ceiling aborts, and pickle
members are never unpickled. Checked at build time (writer) and at read time (reader)."""

import contextlib
import json
import os
import pathlib
import pickle
import tarfile
import threading
import time

import pytest

from omni_moe.data.loader import ResumableLoader
from omni_moe.data.media import (
    MediaLimits,
    decode_audio,
    decode_image,
    decode_video_container,
    decode_video_frames,
    evenly_spaced,
    have_video_container_decoder,
)
from omni_moe.data.quality import BadSampleError, DropPolicy, DropRateExceeded, MediaDecoderUnavailable, SampleRejected
from omni_moe.data.reader import ShardDataset
from omni_moe.data.shards import build_shards
from omni_moe.data.testing import image_bytes, sample_json, sine, wav_bytes, write, write_raw_shard

LENIENT = DropPolicy(max_drop_rate=None)


class Canary:
    """Unpickling this creates a file: proof that a payload ran."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return pathlib.Path.touch, (pathlib.Path(self.path),)


def good(key):
    return {"__key__": key, "json": sample_json(key, "<image>", images=["image0.png"]), "image0.png": image_bytes()}


def bad_samples(canary_path):
    jpeg = image_bytes(fmt="JPEG", size=(32, 32))
    conversation = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "ok"}]
    return {
        "image_decode": {"json": sample_json("trunc-jpeg", "<image>", images=["image0.jpg"]),
                         "image0.jpg": jpeg[: len(jpeg) // 2]},
        "audio_decode": {"json": sample_json("zero-wav", "<audio>", audios=["audio0.wav"]), "audio0.wav": b""},
        "empty_video": {"json": sample_json("no-frames", "<video>", videos=[[]])},
        "missing_media": {"json": sample_json("missing", "<image>", images=["image0.png"])},
        "marker_mismatch": {"json": sample_json("markers", "<image><image>", images=["image0.png"]),
                            "image0.png": image_bytes()},
        "malformed_json": {"json": b'{"id": "broken", "messages": [', "image0.png": image_bytes()},
        "bad_role_order": {"json": json.dumps({"id": "roles", "messages": conversation[::-1]}).encode()},
        "empty_assistant": {"json": sample_json("empty", "hi", answer="   ")},
        "too_long": {"json": sample_json("long", "x" * 500)},
        "non_utf8": {"json": sample_json("utf", "cafe").replace(b"cafe", b"caf\xff")},
        "pickle_member": {"json": sample_json("pickled"), "pkl": pickle.dumps(Canary(canary_path)),
                          "weights.pth": pickle.dumps(Canary(canary_path))},
    }


@pytest.fixture
def bad_shards(tmp_path):
    canary = tmp_path / "canary-was-unpickled"
    cases = bad_samples(canary)
    members = [{"__key__": f"bad-{reason.replace('_', '-')}", **m} for reason, m in cases.items()]
    goods = [good(f"good-{i}") for i in range(6)]
    shards = [write_raw_shard(tmp_path / "shard-000000.tar", goods[:3] + members[::2]),
              write_raw_shard(tmp_path / "shard-000001.tar", goods[3:] + members[1::2])]
    return shards, sorted(cases), canary


def read_all(shards, policy=LENIENT, num_workers=0):
    dataset = ShardDataset(shards, rank=0, world_size=1, max_length=100, policy=policy)
    loader = ResumableLoader(dataset, batch_size=4, num_workers=num_workers)
    return [s["id"] for batch in loader for s in batch], loader.counters


def test_reader_drops_each_bad_case_under_its_own_counter(bad_shards):
    shards, reasons, canary = bad_shards
    ids, counters = read_all(shards)
    assert sorted(ids) == [f"good-{i}" for i in range(6)]
    assert counters.dropped == {reason: 1 for reason in reasons}
    assert (counters.seen, counters.accepted) == (6 + len(reasons), 6)
    assert counters.as_metrics()["data/dropped/pickle_member"] == 1.0
    assert not canary.exists()


def test_worker_counters_reach_the_main_process(bad_shards):
    shards, reasons, canary = bad_shards
    dataset = ShardDataset(shards, rank=0, world_size=1, max_length=100, policy=LENIENT)
    loader = ResumableLoader(dataset, batch_size=4, num_workers=2)
    assert sorted(s["id"] for batch in loader for s in batch) == [f"good-{i}" for i in range(6)]
    assert loader.counters.dropped == {reason: 1 for reason in reasons}
    assert not canary.exists()


def test_pickle_canary_is_live_but_never_executed(bad_shards, tmp_path):
    shards, _, canary = bad_shards
    proof = tmp_path / "proof"
    pickle.loads(pickle.dumps(Canary(proof)))  # the payload really does run when unpickled ...
    assert proof.exists()
    dataset = ShardDataset(shards, rank=0, world_size=1, policy=LENIENT)
    assert "pickled" not in [s["id"] for s in dataset]
    assert not canary.exists()  # ... and reading the shard never unpickled it


def test_strict_mode_raises_naming_sample_and_shard(bad_shards):
    shards, _, _ = bad_shards
    with pytest.raises(BadSampleError) as info:
        list(ShardDataset(shards[:1], rank=0, world_size=1, shuffle=False, policy=DropPolicy(strict=True)))
    assert info.value.key == "bad-image-decode" and info.value.reason == "image_decode"
    assert info.value.shard.endswith("shard-000000.tar")
    # Through real worker processes the exception type and the naming message survive.
    with pytest.raises(BadSampleError, match=r"bad sample 'bad-\w[\w-]*' in .*shard-00000[01]\.tar: \w+"):
        read_all(shards, policy=DropPolicy(strict=True), num_workers=2)


def test_drop_rate_ceiling_aborts_after_min_samples(bad_shards):
    shards, _, _ = bad_shards
    with pytest.raises(DropRateExceeded, match=r"dropped \d+ of \d+ samples .* max_drop_rate 20.0%"):
        read_all(shards, policy=DropPolicy(max_drop_rate=0.2, min_samples=5))
    ids, counters = read_all(shards, policy=DropPolicy(max_drop_rate=0.2, min_samples=1000))
    assert len(ids) == 6 and counters.num_dropped == 11


def test_truncated_tar_yields_no_partial_sample(tmp_path):
    path = write_raw_shard(tmp_path / "t.tar", [good("a"), good("b"), good("c")])
    with tarfile.open(path) as tar:
        last_json = next(m for m in tar.getmembers() if m.name == "c.json")
    data = pathlib.Path(path).read_bytes()
    pathlib.Path(path).write_bytes(data[: last_json.offset_data + 10])  # cut inside c.json's bytes
    ids, counters = read_all([path])
    assert sorted(ids) == ["a", "b"]
    assert counters.dropped == {"malformed_json": 1, "shard_read_error": 1}  # partial c, then the tar error


def test_video_container_without_pyav_is_a_clear_error(tmp_path):
    sample = {"__key__": "clip-7", "json": sample_json("clip-7", "<video>", videos=["video0.mp4"]),
              "video0.mp4": b"\x00\x00\x00\x18ftypmp42 not a real movie"}
    path = write_raw_shard(tmp_path / "v.tar", [sample])
    dataset = ShardDataset([path], rank=0, world_size=1, policy=LENIENT)
    if have_video_container_decoder():
        assert list(dataset) == []  # PyAV present: corrupt container is counted as video_decode
        return
    with pytest.raises(MediaDecoderUnavailable, match=r"videos\[0\] \(clip-7 in .*v\.tar\).*needs PyAV"):
        list(dataset)


def write_bad_manifest(root):
    jpeg = image_bytes(fmt="JPEG", size=(32, 32))
    write(root / "img/ok.png", image_bytes())
    write(root / "img/trunc.jpg", jpeg[: len(jpeg) // 2])
    write(root / "aud/zero.wav", b"")
    write(root / "aud/ok.wav", wav_bytes([sine(100, 8000, 0.01)], 8000))

    def line(sample_id, content="hi", answer="ok", **media):
        return json.dumps({"id": sample_id, "messages": [{"role": "user", "content": content},
                                                         {"role": "assistant", "content": answer}], **media})

    lines = [
        line("ok-image", "<image>", images=["img/ok.png"]),
        line("ok-audio", "<audio>", audios=["aud/ok.wav"]),
        line("trunc-jpeg", "<image>", images=["img/trunc.jpg"]),
        line("zero-wav", "<audio>", audios=["aud/zero.wav"]),
        line("no-frames", "<video>", videos=[[]]),
        line("missing", "<image>", images=["img/nope.png"]),
        line("markers", "<image>"),
        "{oops",
        json.dumps({"id": "roles", "messages": [{"role": "assistant", "content": "a"}]}),
        line("empty", answer=""),
        line("long", "x" * 500),
        line("escape", "<image>", images=["../outside.png"]),
    ]
    manifest = root / "bad.jsonl"
    manifest.write_bytes(("\n".join(lines) + "\n").encode() + b'{"id": "utf", "messages": "\xff"}\n')
    return manifest


def test_writer_rejects_each_bad_case_into_the_index(tmp_path):
    manifest = write_bad_manifest(tmp_path)
    index = build_shards(manifest, tmp_path, tmp_path / "out", max_length=100, policy=LENIENT, progress=False)
    assert index["num_samples"] == 2
    expected = {"image_decode": 1, "audio_decode": 1, "empty_video": 1, "missing_media": 1, "marker_mismatch": 1,
                "malformed_json": 1, "bad_role_order": 1, "empty_assistant": 1, "too_long": 1, "unsafe_path": 1,
                "non_utf8": 1}
    assert index["counters"]["dropped"] == expected
    by_id = {r["id"]: r for r in index["rejected"]}
    assert by_id["trunc-jpeg"]["where"] == "bad.jsonl:3"
    assert "does not decode as an image" in by_id["trunc-jpeg"]["message"]
    assert by_id[None]["reason"] in ("malformed_json", "non_utf8")
    assert sorted(s["id"] for s in ShardDataset(tmp_path / "out", rank=0, world_size=1)) == ["ok-audio", "ok-image"]


def test_writer_strict_mode_and_ceiling(tmp_path):
    manifest = write_bad_manifest(tmp_path)
    with pytest.raises(BadSampleError, match=r"bad sample 'trunc-jpeg' in bad\.jsonl:3: image_decode"):
        build_shards(manifest, tmp_path, tmp_path / "out", policy=DropPolicy(strict=True), progress=False)
    assert not list((tmp_path / "out").glob("*.tmp"))  # no half-written shard left behind
    with pytest.raises(DropRateExceeded, match="dropped 3 of 5 samples"):
        build_shards(manifest, tmp_path, tmp_path / "out", policy=DropPolicy(max_drop_rate=0.5, min_samples=5),
                     progress=False)


# ----------------------------------------------------------------------------- the decode contract (data/media.py)
def wav_declaring(rate: int, samples: int = 300) -> bytes:
    """A valid 16-bit mono WAV whose header is then patched to declare `rate` Hz (0 Hz cannot be written)."""
    data = bytearray(wav_bytes([sine(100, 8000, samples / 8000)], 8000))
    data[24:28] = rate.to_bytes(4, "little")
    data[28:32] = (rate * 2).to_bytes(4, "little")
    return bytes(data)


def test_reader_counts_audio_with_an_impossible_sampling_rate(tmp_path):
    zero_hz = {"__key__": "zero-hz", "json": sample_json("zero-hz", "<audio>", audios=["audio0.wav"]),
               "audio0.wav": wav_declaring(0)}
    # 644 bytes at 1 Hz would be resampled to 16,000 x its length
    one_hz = {"__key__": "one-hz", "json": sample_json("one-hz", "<audio>", audios=["audio0.wav"]),
              "audio0.wav": wav_declaring(1)}
    assert len(one_hz["audio0.wav"]) == 644
    path = write_raw_shard(tmp_path / "a.tar", [good("a"), zero_hz, one_hz])
    ids, counters = read_all([path])
    assert ids == ["a"] and counters.dropped == {"audio_decode": 2}


def test_decoders_bound_their_output_and_name_the_cap():
    tight = MediaLimits(max_image_pixels=63, max_audio_seconds=0.5, max_video_frames=3)
    with pytest.raises(SampleRejected, match=r"8x8 pixels, over the 63-pixel limit") as info:
        decode_image(image_bytes(size=(8, 8)), "img", limits=tight)
    assert info.value.reason == "media_too_large"
    with pytest.raises(SampleRejected, match=r"1\.0 s long, over the 0\.5-second limit") as info:
        decode_audio(wav_bytes([sine(100, 8000, 1.0)], 8000), "clip", target_rate=16000, limits=tight)
    assert info.value.reason == "media_too_large"
    frames = decode_video_frames([image_bytes(color=(10 * i, 0, 0)) for i in range(10)], "v",
                                 limits=MediaLimits(max_video_frames=3))
    assert [f.getpixel((0, 0))[0] for f in frames] == [0, 40, 90]  # evenly spaced, first and last kept
    assert evenly_spaced(5, 8) == [0, 1, 2, 3, 4]


@pytest.mark.skipif(not have_video_container_decoder(), reason="PyAV (the 'video' extra) is not installed")
def test_video_container_frames_are_sampled_while_decoding(tmp_path):
    from omni_moe.data.testing import mp4_bytes

    data = mp4_bytes(frames=40, fps=8)
    all_frames, fps = decode_video_container(data, "v")
    assert len(all_frames) == 40 and fps == pytest.approx(8.0)
    frames, sampled_fps = decode_video_container(data, "v", limits=MediaLimits(max_video_frames=4))
    assert len(frames) == 4
    assert sampled_fps == pytest.approx(8.0 * 3 / 39)  # the kept frames still span the clip's 39 frame steps


def write_hostile_manifest(root: pathlib.Path, outside: pathlib.Path) -> pathlib.Path:
    write(root / "img/ok.png", image_bytes())
    write(outside / "secret.png", image_bytes())
    (root / "img/escape.png").symlink_to(outside / "secret.png")
    os.mkfifo(root / "img/fifo.png")
    write(root / "aud/zero_hz.wav", wav_declaring(0))
    write(root / "img/big.png", image_bytes(size=(64, 64), fmt="BMP"))

    def line(sample_id, content, **media):
        return json.dumps({"id": sample_id, "messages": [{"role": "user", "content": content},
                                                         {"role": "assistant", "content": "ok"}], **media})

    lines = [line("ok", "<image>", images=["img/ok.png"]),
             line("nul", "<image>", images=["img/ok.png\u0000.png"]),
             line("symlink-escape", "<image>", images=["img/escape.png"]),
             line("fifo", "<image>", images=["img/fifo.png"]),
             line("zero-hz", "<audio>", audios=["aud/zero_hz.wav"]),
             line("big-file", "<image>", images=["img/big.png"])]
    (root / "hostile.jsonl").write_text("\n".join(lines) + "\n")
    return root / "hostile.jsonl"


def test_writer_rejects_hostile_paths_and_decodes_audio_as_the_reader_will(tmp_path):
    root, outside = tmp_path / "root", tmp_path / "outside"
    manifest = write_hostile_manifest(root, outside)

    def unblock_a_reader_stuck_on_the_fifo():  # old code opened the FIFO blocking: let it fail, not hang
        time.sleep(5)
        with contextlib.suppress(OSError):
            os.close(os.open(root / "img/fifo.png", os.O_WRONLY | os.O_NONBLOCK))

    threading.Thread(target=unblock_a_reader_stuck_on_the_fifo, daemon=True).start()
    index = build_shards(manifest, root, tmp_path / "out", policy=LENIENT, progress=False,
                         limits=MediaLimits(max_file_bytes=4096))
    reasons = {r["id"]: r["reason"] for r in index["rejected"]}
    assert reasons == {"nul": "unsafe_path", "symlink-escape": "unsafe_path", "fifo": "unsafe_path",
                       "zero-hz": "audio_decode", "big-file": "media_too_large"}
    messages = {r["id"]: r["message"] for r in index["rejected"]}
    assert "outside the media root" in messages["symlink-escape"] and "FIFO" in messages["fifo"]
    assert "0 Hz" in messages["zero-hz"]
    assert [s["id"] for s in ShardDataset(tmp_path / "out", rank=0, world_size=1)] == ["ok"]


def test_an_oversized_manifest_line_is_counted_and_the_next_line_still_read(tmp_path):
    """A runaway JSONL line is read in bounded pieces and rejected under its own counter; nothing after it is lost."""
    from omni_moe.data.importers import count_manifest_records, read_manifest

    manifest = tmp_path / "m.jsonl"
    small = json.dumps({"id": "a", "messages": []})
    manifest.write_bytes(f"{small}\n".encode() + b'{"id": "huge", "text": "' + b"x" * 5000 + b'"}\n'
                         + f"{small.replace('a', 'b')}\n".encode() + b"y" * 3000)  # the last line has no newline
    entries = list(read_manifest(manifest, max_record_bytes=1000))
    assert [e.where for e in entries] == ["m.jsonl:1", "m.jsonl:2", "m.jsonl:3", "m.jsonl:4"]
    assert [e.record["id"] for e in entries if e.record] == ["a", "b"]
    assert [e.error.reason for e in entries if e.error] == ["record_too_large", "record_too_large"]
    assert "over 1,000 bytes" in str(entries[1].error)
    assert count_manifest_records(manifest) == 4
    exact = tmp_path / "exact.jsonl"  # a line of exactly the limit (newline excluded) is accepted
    line = json.dumps({"id": "c", "pad": "z" * 50})
    exact.write_text(line + "\n")
    assert [e.record["id"] for e in read_manifest(exact, max_record_bytes=len(line))] == ["c"]
    whole = tmp_path / "m.json"
    whole.write_text(json.dumps([{"id": "a"}] * 50))
    with pytest.raises(ValueError, match=r"m.json is [\d,]+ bytes, over the 100-byte limit .* write it as JSONL"):
        list(read_manifest(whole, max_json_bytes=100))


def test_oversized_shard_members_are_rejected_before_decoding():
    from omni_moe.data.reader import decode_raw_sample

    sample = {**good("big"), "__url__": "shard-000000.tar"}  # as the tar reader yields it
    assert decode_raw_sample(sample)["id"] == "big"
    with pytest.raises(SampleRejected, match=r"record_too_large: the .json member is [\d,]+ bytes, over the 50-byte"):
        decode_raw_sample(sample, max_record_bytes=50)
    size = len(sample["image0.png"])
    with pytest.raises(SampleRejected, match=rf"media_too_large: images\[0\] member 'image0.png' is {size:,} bytes"):
        decode_raw_sample(sample, max_member_bytes=size - 1)
