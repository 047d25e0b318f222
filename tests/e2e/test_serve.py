"""`omni serve` driven with the official `openai` client (and raw HTTP where a client cannot send the request) against
a live server on a tiny model: answers equal `omni chat`'s for the same conversation and media, streaming equals
non-streaming, usage counts, every bad request gets its 4xx and the next request is served, 8 parallel clients get
what they get alone, a full queue answers 503 with Retry-After and cancelled streams free their slots."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx2 as httpx
import openai
import pytest

from omni.chat import ChatSession, GenerationSettings
from omni.cli import main
from tests.e2e.serve_helpers import (
    audio_bytes,
    b64,
    data_url,
    live_server,
    mp4_bytes,
    png_bytes,
    save_serve_model,
)
from tests.tiny import save_tiny_omni_folder

ROOT = Path(__file__).resolve().parents[2]
KEY = "sk-test-7f3a9c"
MODEL = "tiny-omni"


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve")
    media = root / "media"
    (media / "frames").mkdir(parents=True)
    (media / "photo.png").write_bytes(png_bytes(1))
    (media / "clip.mp4").write_bytes(mp4_bytes())
    for i in range(3):
        (media / "frames" / f"f{i}.png").write_bytes(png_bytes(10 + i, (32, 32)))
    (root / "secret.png").write_bytes(png_bytes(2))  # outside the media root
    return {"model": save_serve_model(root / MODEL), "media": media, "outside": root / "secret.png"}


@pytest.fixture(scope="module")
def server(files):
    argv = [str(files["model"]), "--api-key", KEY, "--media-root", str(files["media"]), "--max-body-mb", "1",
            "--max-media-mb", "0.25", "--max-media-per-request", "4", "--max-batch-size", "8"]
    with live_server(argv) as running:
        yield running


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server[0] + "/v1", api_key=KEY, max_retries=0, timeout=120)


def chat_answer(engine, text: str, attachments=(), max_new_tokens: int = 12):
    """What `omni chat` answers on the server's own model (called while the server is idle)."""
    session = ChatSession(engine.model, engine.processor, GenerationSettings(max_new_tokens=max_new_tokens))
    for kind, path in attachments:
        session.attach(kind, str(path))
    return session.ask(text)


def user(*parts) -> list[dict]:
    return [{"role": "user", "content": list(parts)}]


def text_part(text: str) -> dict:
    return {"type": "text", "text": text}


def assert_served_normally(client) -> None:
    reply = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Repeat: a b c"}],
                                           max_tokens=3, temperature=0)
    assert reply.choices[0].finish_reason in ("stop", "length") and reply.usage.completion_tokens >= 1


# ------------------------------------------------------------------------------------------------ the happy paths
def test_models_health_and_text_answer_equal_omni_chat(server, client):
    url, engine, _ = server
    assert [m.id for m in client.models.list().data] == [MODEL]
    assert httpx.get(url + "/health").json()["status"] == "ok"  # no key needed for the health check
    for question in ["What is 2 plus 3?", "Describe the image."]:
        reply = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": question}],
                                               max_tokens=12, temperature=0)
        expected = chat_answer(engine, question)
        choice = reply.choices[0]
        assert choice.message.role == "assistant" and choice.message.content == expected.text
        assert choice.finish_reason == {"eos": "stop", "length": "length"}[expected.stop_reason]
        assert reply.usage.prompt_tokens == expected.prompt_tokens
        assert reply.usage.completion_tokens == expected.tokens
        assert reply.usage.total_tokens == expected.prompt_tokens + expected.tokens
    # max_completion_tokens is max_tokens by another name. Whether this random model ends an answer with its
    # end-of-turn token depends on its init (it stopped within 60 tokens before issue 24 changed the init order, and
    # runs to the limit since): the end-of-turn -> "stop" path is pinned by tests/unit/test_serve_stream.py, and
    # stop strings -> "stop" by test_streaming_equals_non_streaming_with_usage.
    long = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Repeat: a b c"}],
                                          max_completion_tokens=60, temperature=0)
    expected = chat_answer(engine, "Repeat: a b c", max_new_tokens=60)
    assert long.choices[0].message.content == expected.text and long.usage.completion_tokens == expected.tokens
    assert long.choices[0].finish_reason == {"eos": "stop", "length": "length"}[expected.stop_reason]


def test_streaming_equals_non_streaming_with_usage(client):
    messages = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "What is 2 plus 3?"},
                {"role": "assistant", "content": "5"}, {"role": "user", "content": "Repeat: a b c"}]
    whole = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=40, temperature=0)
    chunks = list(client.chat.completions.create(model=MODEL, messages=messages, max_tokens=40, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    content = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert len(content) > 1  # it streamed
    assert "".join(content) == whole.choices[0].message.content
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finals == [whole.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.model_dump() == whole.usage.model_dump()
    assert len({c.id for c in chunks}) == 1
    # without include_usage no usage chunk; stop strings cut the answer before them and end with "stop"
    plain = list(client.chat.completions.create(model=MODEL, messages=messages, max_tokens=40, temperature=0,
                                                stream=True))
    assert all(c.usage is None and c.choices for c in plain)
    stop_at = whole.choices[0].message.content[3:5]
    stopped = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=40, temperature=0,
                                             stop=[stop_at])
    assert stopped.choices[0].finish_reason == "stop"
    assert whole.choices[0].message.content.startswith(stopped.choices[0].message.content)
    assert stop_at not in stopped.choices[0].message.content


def test_sampling_is_seeded(client):
    ask = dict(model=MODEL, messages=[{"role": "user", "content": "Describe the image."}], max_tokens=16,
               temperature=1.5, top_p=0.95)
    first, again = (client.chat.completions.create(**ask, seed=7).choices[0].message.content for _ in range(2))
    assert first == again
    others = {client.chat.completions.create(**ask, seed=s).choices[0].message.content for s in (1, 2, 3)}
    assert len(others | {first}) > 1  # seeds matter, so sampling happened


@pytest.mark.parametrize("kind, make_part, attachment", [
    ("png", lambda f: {"type": "image_url", "image_url": {"url": data_url(png_bytes(1), "image/png")}}, "photo.png"),
    ("jpeg", lambda f: {"type": "image_url", "image_url": {"url": data_url(png_bytes(3, fmt="JPEG"), "image/jpeg")}},
     None),
    ("webp", lambda f: {"type": "image_url", "image_url": {"url": data_url(png_bytes(4, fmt="WEBP"), "image/webp")}},
     None),
    ("image file", lambda f: {"type": "image_url", "image_url": {"url": "photo.png"}}, "photo.png"),
    ("image file://", lambda f: {"type": "image_url", "image_url": {"url": f"file://{f['media'] / 'photo.png'}"}},
     "photo.png"),
    ("wav", lambda f: {"type": "input_audio", "input_audio": {"data": b64(audio_bytes("WAV")), "format": "wav"}},
     "beep.wav"),
    ("flac", lambda f: {"type": "input_audio", "input_audio": {"data": b64(audio_bytes("FLAC")), "format": "flac"}},
     "beep.wav"),
    ("mp3", lambda f: {"type": "input_audio", "input_audio": {"data": b64(audio_bytes("MP3", 16000)),
                                                             "format": "mp3"}}, None),
    ("mp4", lambda f: {"type": "video_url", "video_url": {"url": data_url(mp4_bytes(), "video/mp4")}}, "clip.mp4"),
    ("video file", lambda f: {"type": "video_url", "video_url": {"url": "clip.mp4"}}, "clip.mp4"),
    ("frame folder", lambda f: {"type": "video_url", "video_url": {"url": "frames"}}, "frames"),
])
def test_each_media_part_answers_as_omni_chat(server, client, files, tmp_path, kind, make_part, attachment):
    """The server's answer for a medium equals `omni chat`'s for the same file attached by path."""
    _, engine, _ = server
    reply = client.chat.completions.create(model=MODEL, messages=user(make_part(files), text_part("What is shown?")),
                                           max_tokens=12, temperature=0)
    media_tokens = reply.usage.prompt_tokens - client.chat.completions.create(
        model=MODEL, messages=user(text_part("What is shown?")), max_tokens=1).usage.prompt_tokens
    assert media_tokens > 0  # the medium became placeholder tokens
    if attachment is None:  # formats omni chat reads the same way; decoding proven by the 200 and token count
        return
    path = files["media"] / attachment
    if attachment == "beep.wav":
        path = tmp_path / "beep.wav"
        path.write_bytes(audio_bytes("WAV"))
    expected = chat_answer(engine, "What is shown?", [(kind_of(make_part(files)), path)])
    assert reply.choices[0].message.content == expected.text
    assert reply.usage.prompt_tokens == expected.prompt_tokens


def kind_of(part: dict) -> str:
    return {"image_url": "image", "input_audio": "audio", "video_url": "video"}[part["type"]]


# ------------------------------------------------------------------------------------------------ bad requests
def _image(url: str) -> dict:
    return {"type": "image_url", "image_url": {"url": url}}


BAD_REQUESTS = {
    # name: (extra request fields or a full messages list, status, code, param)
    "schema: unknown role": ({"messages": [{"role": "robot", "content": "hi"}]}, 400, "invalid_value",
                             "messages[0].role"),
    "schema: temperature out of range": ({"temperature": 5}, 400, "invalid_value", "temperature"),
    "schema: wrong type": ({"max_tokens": "many"}, 400, "invalid_value", "max_tokens"),
    "schema: unknown parameter": ({"tools": []}, 400, "invalid_value", "tools"),
    "n above 1": ({"n": 2}, 400, "invalid_value", "n"),
    "broken base64": ({"messages": user(_image("data:image/png;base64,@@not-base64@@"))}, 400, "invalid_base64",
                      "messages[0].content[0].image_url.url"),
    "undecodable image": ({"messages": user(_image(data_url(b"\x89PNG\r\n\x1a\n garbage", "image/png")))}, 400,
                          "invalid_media", "messages[0].content[0]"),
    "undecodable audio": ({"messages": user({"type": "input_audio", "input_audio": {"data": b64(b"RIFF nope"),
                                                                                  "format": "wav"}})},
                          400, "invalid_media", "messages[0].content[0]"),
    "truncated video": ({"messages": user({"type": "video_url", "video_url": {
        "url": data_url(mp4_bytes()[:600], "video/mp4")}})}, 400, "invalid_media", "messages[0].content[0]"),
    "oversized medium": ({"messages": user(_image(data_url(png_bytes(5, (300, 300)), "image/png")))}, 400,
                         "media_too_large", "messages[0].content[0].image_url.url"),
    "unsupported image type": ({"messages": user(_image(data_url(png_bytes(1), "image/svg+xml")))}, 400,
                               "unsupported_media", "messages[0].content[0].image_url.url"),
    "more media than the server takes": ({"messages": user(*[_image("photo.png")] * 5)}, 400, "too_many_media",
                                         "messages"),
    "prompt over the context length": ({"messages": [{"role": "user", "content": "a b c " * 400}]}, 400,
                                       "context_length_exceeded", "messages"),
    "max_tokens over the context length": ({"max_tokens": 5000}, 400, "context_length_exceeded", "max_tokens"),
    "path outside --media-root": ({"messages": user(_image("../secret.png"))}, 403, "path_outside_media_root",
                                  "messages[0].content[0].image_url.url"),
    "absolute path outside --media-root": ({"messages": user(_image("file:///etc/hostname"))}, 403,
                                           "path_outside_media_root", "messages[0].content[0].image_url.url"),
    "path with a NUL byte": ({"messages": user(_image("photo\x00.png"))}, 400, "invalid_media",
                             "messages[0].content[0].image_url.url"),
    "missing file": ({"messages": user(_image("nope.png"))}, 400, "invalid_media",
                     "messages[0].content[0].image_url.url"),
    "remote URL": ({"messages": user(_image("https://example.com/cat.png"))}, 400, "unsupported_url",
                   "messages[0].content[0].image_url.url"),
    "unknown model": ({"model": "gpt-4o"}, 404, "model_not_found", "model"),
}


@pytest.mark.parametrize("name", list(BAD_REQUESTS))
def test_bad_request_gets_its_4xx_and_the_server_goes_on(server, client, name):
    fields, status, code, param = BAD_REQUESTS[name]
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, **fields}
    with pytest.raises(openai.APIStatusError) as info:
        client.chat.completions.create(**body)
    error = info.value
    assert error.status_code == status, error.body
    assert set(error.body) == {"message", "type", "param", "code"}  # OpenAI's error object (the client unwraps it)
    assert (error.body["code"], error.body["param"]) == (code, param), error.body
    assert "Traceback" not in error.body["message"] and str(server[0]) not in error.body["message"]
    assert_served_normally(client)


def test_raw_http_errors(server, client):
    url = server[0]
    auth = {"Authorization": f"Bearer {KEY}"}
    cases = [
        (dict(content=b'{"model": "tiny-omni", "messages": [', headers=auth), 400, "invalid_json"),
        (dict(content=b"[1, 2]", headers=auth), 400, None),
        (dict(content=b"x" * (1024 * 1024 + 1), headers=auth), 413, "request_too_large"),
        (dict(json={"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}), 401, "invalid_api_key"),
        (dict(json={"model": MODEL, "messages": []}, headers={"Authorization": "Bearer wrong"}), 401,
         "invalid_api_key"),
    ]
    for kwargs, status, code in cases:
        response = httpx.post(url + "/v1/chat/completions", timeout=60, **kwargs)
        assert response.status_code == status, response.text
        error = response.json()["error"]
        assert set(error) == {"message", "type", "param", "code"} and error["code"] == code
    assert httpx.get(url + "/v1/nothing-here", headers=auth).status_code == 404
    assert httpx.get(url + "/v1/models").status_code == 401
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=url + "/v1", api_key="wrong", max_retries=0).models.list()
    assert_served_normally(client)


# ------------------------------------------------------------------------------------------------ concurrency
def test_parallel_clients_get_what_they_get_alone(server, client, files):
    _, engine, _ = server
    questions = ["What is 2 plus 3?", "Describe the image.", "Repeat: a b c", "How many beeps?", "1 2 3",
                 "Which way does the square move?", "blue green cyan", "left right up down"]
    requests = [user(_image(data_url(png_bytes(i), "image/png")), text_part(q)) if i % 3 == 0 else
                [{"role": "user", "content": q}] for i, q in enumerate(questions)]
    ask = lambda messages: client.chat.completions.create(model=MODEL, messages=messages, max_tokens=16,  # noqa: E731
                                                          temperature=0)
    alone = [ask(m) for m in requests]
    start = threading.Barrier(len(requests))

    def together(messages):
        start.wait()
        return ask(messages)

    with ThreadPoolExecutor(len(requests)) as pool:
        parallel = list(pool.map(together, requests))
    assert engine.stats()["largest_batch"] > 1  # they really shared batches
    for a, b in zip(alone, parallel):
        assert (b.choices[0].message.content, b.choices[0].finish_reason, b.usage.completion_tokens) == \
               (a.choices[0].message.content, a.choices[0].finish_reason, a.usage.completion_tokens)


def test_full_queue_gets_503_and_cancelled_streams_free_their_slots(files):
    """One running request and a queue of one: the next gets 503 + Retry-After; closing the waiting stream frees the
    queue slot at once, closing the running one stops its generation early, and so does a non-streaming client that
    disconnects."""
    with live_server([str(files["model"]), "--max-batch-size", "1", "--max-queue", "1"]) as (url, engine, _):
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=60)
        # "hi" runs to max_tokens on this model (asserted at the end), so only a cancellation stops it early
        long = dict(model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=400, temperature=0,
                    stream=True)

        def wait_for(condition, what):
            deadline = time.monotonic() + 30
            while not condition(engine.stats()):
                assert time.monotonic() < deadline, f"timed out waiting for {what}: {engine.stats()}"
                time.sleep(0.02)

        running = client.chat.completions.create(**long)
        next(iter(running))  # the role chunk: it is admitted
        wait_for(lambda s: s["running"] == 1, "the first request to run")
        waiting = client.chat.completions.create(**long)
        wait_for(lambda s: s["waiting"] == 1, "the second request to queue")
        with pytest.raises(openai.APIStatusError) as info:
            client.chat.completions.create(**{**long, "stream": False})
        assert info.value.status_code == 503 and info.value.response.headers["retry-after"] == "1"
        assert info.value.body["code"] == "server_overloaded"
        waiting.close()
        wait_for(lambda s: s["waiting"] == 0, "the cancelled waiting stream to leave the queue")
        before = engine.stats()["generated_tokens"]
        running.close()
        wait_for(lambda s: s["running"] == 0, "the cancelled running stream to stop")
        assert engine.stats()["generated_tokens"] - before < 400  # stopped early, not run to max_tokens
        # a non-streaming client that gives up: its request is stopped too
        before = engine.stats()["generated_tokens"]
        with pytest.raises(httpx.TimeoutException):
            httpx.post(url + "/v1/chat/completions", json={**long, "stream": False}, timeout=0.5)
        wait_for(lambda s: s["running"] == 0, "the abandoned request to stop")
        assert engine.stats()["generated_tokens"] - before < 400
        reply = client.chat.completions.create(**{**long, "stream": False})
        assert (reply.choices[0].finish_reason, reply.usage.completion_tokens) == ("length", 400)


# ------------------------------------------------------------------------------------------------ the command line
def test_cli_flags_are_checked_before_loading(files, capsys):
    for flags, named in [(["--max-queue", "0"], "--max-queue"), (["--max-batch-size", "-1"], "--max-batch-size"),
                         (["--media-root", str(files["outside"])], "--media-root"),
                         (["--max-body-mb", "0"], "--max-body-mb"), (["--api-key", " "], "--api-key"),
                         (["--port", "0"], "--port")]:
        assert main(["serve", str(files["model"]), *flags]) == 1
        assert named in capsys.readouterr().err


def test_omni_serve_command_with_key_from_the_environment(files, tmp_path):
    """The real command in its own process: binds loopback, takes the key from OMNI_API_KEY, never logs it, serves,
    and stops cleanly on SIGINT."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    log_path = tmp_path / "serve.log"
    env = {**os.environ, "OMNI_API_KEY": KEY, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    with open(log_path, "wb") as log:
        process = subprocess.Popen([sys.executable, "-m", "omni.cli", "serve", str(files["model"]), "--port",
                                    str(port), "--log-level", "debug", "--served-model-name", "served"],
                                   stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 120
        while True:
            assert process.poll() is None, log_path.read_text()
            assert time.monotonic() < deadline, "omni serve did not come up"
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.2)
        client = openai.OpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0, timeout=60)
        assert [m.id for m in client.models.list().data] == ["served"]
        reply = client.chat.completions.create(model="served", messages=[{"role": "user", "content": "hi"}],
                                               max_tokens=3)
        assert reply.usage.completion_tokens == 3
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=url + "/v1", api_key="nope", max_retries=0).models.list()
        process.send_signal(signal.SIGINT)
        assert process.wait(timeout=30) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    output = log_path.read_text()
    assert "127.0.0.1" in output and "API key required" in output
    assert KEY not in output  # the key is never logged


def test_media_the_model_does_not_take(tmp_path):
    """A model without an audio encoder: an audio part is a 400 naming it, and images still work."""
    path = save_tiny_omni_folder(tmp_path / "no-audio", audio_config=None)
    with live_server([str(path)]) as (url, engine, _):
        assert engine.processor.feature_extractor is None
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=60)
        audio = {"type": "input_audio", "input_audio": {"data": b64(audio_bytes("WAV")), "format": "wav"}}
        with pytest.raises(openai.BadRequestError) as info:
            client.chat.completions.create(model="no-audio", messages=user(text_part("hi"), audio), max_tokens=2)
        assert (info.value.body["code"], info.value.body["param"]) == ("unsupported_media", "messages[0].content[1]")
        assert "no audio" in info.value.body["message"]
        image = _image(data_url(png_bytes(1), "image/png"))
        assert client.chat.completions.create(model="no-audio", messages=user(image, text_part("hi")),
                                              max_tokens=2).usage.completion_tokens >= 1
