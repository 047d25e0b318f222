"""Video container files (mp4) through PyAV, for real: a clip encoded here decodes to the right frames,
travels through `build_shards` and `ShardDataset` as a frame list, a cut-off or corrupt file is dropped
under `video_decode` (strict mode raises naming the sample), and without PyAV the error says what to
install and which sample needed it."""

import io
import json
import sys
import tarfile

import av
import numpy as np
import pytest

from omni_moe.data.media import decode_video_container
from omni_moe.data.quality import (
    EMPTY_VIDEO,
    VIDEO_DECODE,
    BadSampleError,
    DropPolicy,
    MediaDecoderUnavailable,
    SampleRejected,
)
from omni_moe.data.reader import ShardDataset
from omni_moe.data.shards import build_shards
from omni_moe.data.testing import sample_json, write, write_raw_shard

LENIENT = DropPolicy(max_drop_rate=None)
FRAMES, SIZE, FPS, STEP = 6, 32, 10, 4  # the square moves STEP pixels right per frame


def _encoder() -> str:
    """The first MPEG-4-family encoder this PyAV wheel ships (its bundled FFmpeg decides)."""
    for name in ("mpeg4", "libx264"):
        try:
            return av.Codec(name, "w").name
        except ValueError:  # PyAV's UnknownCodecError: this wheel's FFmpeg lacks that encoder
            pass
    raise RuntimeError("this PyAV build has neither an 'mpeg4' nor a 'libx264' encoder")


def square_frame(index: int) -> np.ndarray:
    """Black 32x32 frame with a red 8x8 square whose left edge is at x = 2 + STEP * index."""
    frame = np.zeros((SIZE, SIZE, 3), dtype=np.uint8)
    left = 2 + STEP * index
    frame[12:20, left:left + 8] = (255, 0, 0)
    return frame


def encode_mp4(path, *, faststart: bool = False) -> bytes:
    """Write the moving-square clip to `path` (faststart puts the index box before the frame data:
    FFmpeg needs a real file to rewrite it, hence a path rather than a buffer) and return its bytes."""
    with av.open(str(path), "w", format="mp4", options={"movflags": "faststart"} if faststart else {}) as container:
        stream = container.add_stream(_encoder(), rate=FPS)
        stream.width = stream.height = SIZE
        stream.pix_fmt = "yuv420p"
        for index in range(FRAMES):
            container.mux(stream.encode(av.VideoFrame.from_ndarray(square_frame(index), format="rgb24")))
        container.mux(stream.encode())  # flush the encoder's delayed frames
    return path.read_bytes()


def audio_only_mp4() -> bytes:
    buffer = io.BytesIO()
    with av.open(buffer, "w", format="mp4") as container:
        stream = container.add_stream("aac", rate=16000)
        frame = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp", layout="mono")
        frame.sample_rate = 16000
        container.mux(stream.encode(frame))
        container.mux(stream.encode())
    return buffer.getvalue()


def red_centroid(image) -> tuple[float, float]:
    """(x, y) centre of the red pixels; lossy coding blurs edges, so threshold rather than match."""
    pixels = np.asarray(image).astype(np.int16)
    red = (pixels[..., 0] > 128) & (pixels[..., 1] < 100) & (pixels[..., 2] < 100)
    assert red.sum() > 20, "the red square vanished from a decoded frame"
    ys, xs = np.nonzero(red)
    return float(xs.mean()), float(ys.mean())


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    root = tmp_path_factory.mktemp("clips")
    return {"plain": encode_mp4(root / "plain.mp4"), "faststart": encode_mp4(root / "faststart.mp4", faststart=True)}


def corrupt_clips(clips) -> dict[str, bytes]:
    plain, faststart = clips["plain"], clips["faststart"]
    return {
        "half": plain[: len(plain) // 2],  # index box (at the end) lost: FFmpeg cannot open it
        # index first, frame data cut: FFmpeg alone would return the first frames without an error
        "tail-cut": faststart[:-100],
        "garbage": plain[:32] + bytes(range(256)) * 4,  # a valid 'ftyp' box, then noise
        # no 'ftyp' (so no box-size check) and no index box: FFmpeg opens it with a bare 'data' stream
        "headless": plain[plain.index(b"mdat") - 4: len(plain) // 2],
    }


def video_line(sample_id: str, rel: str, **extra) -> str:
    return json.dumps({"id": sample_id, "videos": [rel], **extra, "messages": [
        {"role": "user", "content": "<video>\nWhich way does the square move?"},
        {"role": "assistant", "content": "right"}]})


def test_decoded_clip_has_its_frames_fps_and_motion(clips):
    for layout, data in clips.items():
        frames, fps = decode_video_container(data, f"{layout}.mp4")
        assert len(frames) == FRAMES, layout
        assert all(f.size == (SIZE, SIZE) and f.mode == "RGB" for f in frames), layout
        assert fps == pytest.approx(FPS)
        centroids = [red_centroid(f) for f in frames]
        xs, ys = np.array([c[0] for c in centroids]), np.array([c[1] for c in centroids])
        assert np.allclose(np.diff(xs), STEP, atol=1.0), f"{layout}: square x centres {xs} do not move right"
        assert np.allclose(xs, 5.5 + STEP * np.arange(FRAMES), atol=1.0), xs
        assert np.allclose(ys, 15.5, atol=1.0), ys


def test_mp4_sample_goes_through_shards_and_reader_as_frames(tmp_path, clips):
    media = tmp_path / "media"
    write(media / "clip.mp4", clips["plain"])
    manifest = tmp_path / "manifest.jsonl"
    manifest.write_text(video_line("clip-auto-fps", "clip.mp4") + "\n"
                        + video_line("clip-given-fps", "clip.mp4", video_fps=[5.0]) + "\n", encoding="utf-8")
    index = build_shards(manifest, media, tmp_path / "shards", progress=False, policy=LENIENT)
    assert index["num_samples"] == 2 and index["rejected"] == []
    assert index["media"]["videos"] == 2 and index["media"]["video_frames"] == 2 * FRAMES
    with tarfile.open(tmp_path / "shards" / index["shards"][0]["name"]) as tar:
        stored = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
    assert stored["clip-auto-fps.video0.mp4"] == clips["plain"]  # container bytes stored as-is

    samples = {s["id"]: s for s in ShardDataset(tmp_path / "shards", rank=0, world_size=1, shuffle=False,
                                                  policy=DropPolicy(strict=True))}
    assert sorted(samples) == ["clip-auto-fps", "clip-given-fps"]
    for sample in samples.values():
        (frames,) = sample["videos"]
        assert len(frames) == FRAMES and all(f.size == (SIZE, SIZE) for f in frames)
        assert red_centroid(frames[-1])[0] > red_centroid(frames[0])[0] + STEP * (FRAMES - 2)
    assert samples["clip-auto-fps"]["video_fps"] == [pytest.approx(FPS)]  # from the container
    assert samples["clip-given-fps"]["video_fps"] == [5.0]  # the manifest's value wins


def test_corrupt_mp4_is_dropped_as_video_decode_everywhere(tmp_path, clips):
    bad = corrupt_clips(clips)
    for name, data in bad.items():
        with pytest.raises(SampleRejected, match=rf"{name}\.mp4") as caught:
            decode_video_container(data, f"{name}.mp4")
        assert caught.value.reason == VIDEO_DECODE, (name, caught.value)

    # writer: each bad file is rejected under its own reason, the good one is kept
    media = tmp_path / "media"
    lines = [video_line("good", "good.mp4")]
    write(media / "good.mp4", clips["plain"])
    for name, data in bad.items():
        write(media / f"{name}.mp4", data)
        lines.append(video_line(f"bad-{name}", f"{name}.mp4"))
    manifest = tmp_path / "manifest.jsonl"
    manifest.write_text("\n".join(lines) + "\n", encoding="utf-8")
    index = build_shards(manifest, media, tmp_path / "shards", progress=False, policy=LENIENT)
    assert index["num_samples"] == 1
    assert index["counters"]["dropped"] == {VIDEO_DECODE: len(bad)}
    assert sorted(r["id"] for r in index["rejected"]) == sorted(f"bad-{n}" for n in bad)
    with pytest.raises(BadSampleError, match=r"bad-half.*video_decode.*half\.mp4.*strict"):
        build_shards(manifest, media, tmp_path / "strict", progress=False, policy=DropPolicy(strict=True))

    # reader (shards from elsewhere, bypassing the writer's checks): same verdict, strict names the key
    raws = [{"__key__": "good", "json": sample_json("good", "<video>", videos=["video0.mp4"]),
             "video0.mp4": clips["plain"]}]
    raws += [{"__key__": f"bad-{n}", "json": sample_json(f"bad-{n}", "<video>", videos=["video0.mp4"]),
              "video0.mp4": data} for n, data in bad.items()]
    shard = write_raw_shard(tmp_path / "raw" / "shard-000000.tar", raws)
    dataset = ShardDataset([shard], rank=0, world_size=1, shuffle=False, policy=LENIENT)
    tagged = list(dataset.iter_tagged())
    assert [t.item["id"] for t in tagged if not t.drops_only] == ["good"]
    assert tagged[-1].counters["dropped"] == {VIDEO_DECODE: len(bad)}
    strict = ShardDataset([shard], rank=0, world_size=1, shuffle=False, policy=DropPolicy(strict=True))
    with pytest.raises(BadSampleError, match=r"'bad-half' in .*shard-000000\.tar: video_decode") as caught:
        list(strict)
    assert caught.value.key == "bad-half" and caught.value.reason == VIDEO_DECODE


def test_mp4_without_a_video_stream_is_empty_video():
    with pytest.raises(SampleRejected, match=r"voice\.mp4 has no video stream \(only audio\)") as caught:
        decode_video_container(audio_only_mp4(), "voice.mp4")
    assert caught.value.reason == EMPTY_VIDEO


def test_without_pyav_the_error_names_the_sample_and_the_fix(tmp_path, clips, monkeypatch):
    # PyAV is installed here, so its absence has to be simulated: a None entry makes `import av` fail.
    monkeypatch.setitem(sys.modules, "av", None)
    with pytest.raises(MediaDecoderUnavailable, match=r"clip\.mp4 is a video container file.*needs PyAV"):
        decode_video_container(clips["plain"], "clip.mp4")

    # reader: raised even under a lenient policy (an environment problem is not bad data), naming key + shard
    raw = {"__key__": "clip-7", "json": sample_json("clip-7", "<video>", videos=["video0.mp4"]),
           "video0.mp4": clips["plain"]}
    shard = write_raw_shard(tmp_path / "raw" / "v.tar", [raw])
    with pytest.raises(MediaDecoderUnavailable, match=r"videos\[0\] \(clip-7 in .*v\.tar\).*pip install av"):
        list(ShardDataset([shard], rank=0, world_size=1, policy=LENIENT))

    # writer: stops (not a drop) naming the media file, and leaves no half-written shard behind
    write(tmp_path / "media" / "clip.mp4", clips["plain"])
    manifest = tmp_path / "manifest.jsonl"
    text_line = json.dumps({"id": "text-0", "messages": [{"role": "user", "content": "hi"},
                                                         {"role": "assistant", "content": "ok"}]})
    manifest.write_text(text_line + "\n" + video_line("clip-8", "clip.mp4") + "\n", encoding="utf-8")
    with pytest.raises(MediaDecoderUnavailable, match=r"videos\[0\] 'clip\.mp4'.*needs PyAV"):
        build_shards(manifest, tmp_path / "media", tmp_path / "shards", progress=False, policy=LENIENT)
    assert list((tmp_path / "shards").iterdir()) == []
