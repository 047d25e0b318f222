"""`omni chat` end to end on a tiny random exported folder, driven for real: through a pseudo-terminal (Ctrl-C
included), through piped stdin, and one-shot. A random model answers gibberish, so the tests assert structure, token
counts, determinism and error handling, never content; the streamed answer must equal a plain `generate` decode."""

import fcntl
import json
import os
import pty
import re
import select
import signal
import struct
import subprocess
import sys
import termios
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile
from PIL import Image

from omni.chat import ChatSession, GenerationSettings, SettingError
from omni.cli import main
from omni.loading import load_model_and_processor
from omni.media_inputs import AttachmentError, load_attachment, split_inline_markers
from tests.e2e.serve_helpers import mp4_bytes
from tests.tiny import save_tiny_omni_folder

ROOT = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "TOKENIZERS_PARALLELISM": "false"}
CHAT = [sys.executable, "-m", "omni.cli", "chat"]
TAKE_TERMINAL_THEN_EXEC = "import fcntl, os, sys, termios; fcntl.ioctl(0, termios.TIOCSCTTY, 0); os.execv(sys.argv[1], sys.argv[1:])"


def write_mp4(path: Path, frames: int = 4, size: int = 32) -> None:
    path.write_bytes(mp4_bytes(frames, size))


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("chat")
    rng = np.random.default_rng(0)
    paths = {"model": save_tiny_omni_folder(root / "model"), "png": root / "photo one.png", "wav": root / "beep.wav",
             "frames": root / "frames", "mp4": root / "clip.mp4", "bad_png": root / "corrupt.png",
             "cut_mp4": root / "cut.mp4", "txt": root / "notes.txt", "empty_wav": root / "empty.wav",
             "zero_hz_wav": root / "zero_hz.wav", "fifo_png": root / "fifo.png"}
    Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(paths["png"])
    # 8 kHz: the chat resamples to the feature extractor's 16 kHz
    soundfile.write(paths["wav"], (0.3 * np.sin(np.arange(4000) / 3)).astype(np.float32), 8000)
    paths["frames"].mkdir()
    for i in range(3):
        Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(paths["frames"] / f"f{i}.png")
    write_mp4(paths["mp4"])
    paths["cut_mp4"].write_bytes(paths["mp4"].read_bytes()[: paths["mp4"].stat().st_size // 2])
    paths["bad_png"].write_bytes(b"\x89PNG\r\n\x1a\n this is not an image")
    paths["txt"].write_text("hello")
    paths["empty_wav"].write_bytes(b"")
    header = bytearray(paths["wav"].read_bytes())
    header[24:32] = bytes(8)  # declares 0 Hz (and 0 bytes/s): once a ZeroDivisionError that ended the chat
    paths["zero_hz_wav"].write_bytes(bytes(header))
    os.mkfifo(paths["fifo_png"])  # reading it would block forever
    return {k: str(v) for k, v in paths.items()}


@pytest.fixture(scope="module")
def loaded(files):
    return load_model_and_processor(files["model"])


def prompt_blocks(stderr: str) -> list[str]:
    return re.findall(r"--- prompt ---\n(.*?)\n--- end of prompt ---", stderr, flags=re.DOTALL)


# ---------------------------------------------------------------------- in-process pieces
def test_settings_are_validated_all_or_nothing():
    settings = GenerationSettings().updated(["temperature=0.5", "do_sample=true", "max_new_tokens=7", "top_k=0"])
    assert (settings.temperature, settings.do_sample, settings.max_new_tokens, settings.top_k) == (0.5, True, 7, 0)
    for bad, message in [("top_p=2", "top_p must be"), ("max_new_tokens=0", "max_new_tokens must be"),
                         ("max_new_tokens=2.5", "max_new_tokens must be"), ("do_sample=maybe", "do_sample must be"),
                         ("temperature=-1", "temperature must be"), ("beams=2", "unknown setting 'beams'"),
                         ("temperature", "expected key=value")]:
        with pytest.raises(SettingError, match=re.escape(message)):
            settings.updated(["max_new_tokens=9", bad])
    assert settings.max_new_tokens == 7  # a rejected /set changes nothing


def test_attachments_load_or_name_the_path_and_reason(files, loaded):
    _, processor = loaded
    audio = load_attachment("audio", files["wav"], processor)
    assert audio.data.dtype == np.float32 and len(audio.data) == 8000  # 0.25 s at 8 kHz -> 16 kHz
    assert len(load_attachment("video", files["frames"], processor).data) == 3
    clip = load_attachment("video", files["mp4"], processor)
    assert len(clip.data) == 4 and clip.fps == 8.0
    for kind, key, reason in [("image", "bad_png", "does not decode as an image"), ("image", "txt", "unsupported image"),
                              ("video", "cut_mp4", "truncated"), ("audio", "empty_wav", "zero-byte"),
                              ("image", "frames", "is a folder"), ("audio", "nope", "no such file"),
                              ("audio", "zero_hz_wav", "sampling rate of 0 Hz"), ("image", "fifo_png", "a FIFO")]:
        path = files.get(key, "/no/such/file.wav")
        with pytest.raises(AttachmentError) as info:
            load_attachment(kind, path, processor)
        assert str(info.value).startswith(f"{path}: ") and reason in str(info.value), str(info.value)
    assert split_inline_markers("a <image:x y.png> b<audio:c.wav>") == [
        ("text", "a "), ("image", "x y.png"), ("text", " b"), ("audio", "c.wav")]


def test_streamed_answer_equals_plain_generate_decode(files, loaded):
    model, processor = loaded
    session = ChatSession(model, processor, GenerationSettings(max_new_tokens=48))
    for text in [f"Describe the image. <image:{files['png']}>", "What is 2 plus 3?"]:
        conversation = [*session.history, session.user_message(text)]
        inputs = session.model_inputs(conversation)
        plain = model.generate(**inputs, generation_config=session.generation_config())
        expected = plain[0, inputs["input_ids"].shape[1]:]
        chunks = []
        answer = session.ask(text, on_text=chunks.append)
        assert len(chunks) > 1  # it did stream
        assert answer.text == "".join(chunks) == processor.tokenizer.decode(expected, skip_special_tokens=True)
        assert answer.tokens == len(expected) and answer.prompt_tokens == inputs["input_ids"].shape[1]
    assert [m["role"] for m in session.history] == ["user", "assistant"] * 2


def test_one_shot_errors_and_help(files, capsys):
    assert main(["chat", files["model"], "-p", "hi", "--image", files["bad_png"]]) == 1
    assert f"error: {files['bad_png']}: " in capsys.readouterr().err
    assert main(["chat", str(Path(files["model"]).parent / "missing"), "-p", "hi"]) == 1
    assert "no such model folder" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        main(["chat", "--help"])
    assert exit_info.value.code == 0 and "--json" in capsys.readouterr().out


# ---------------------------------------------------------------------- real processes
def test_one_shot_json_is_deterministic_and_matches_generate(files, loaded):
    argv = [*CHAT, files["model"], "-p", f"What is shown? <audio:{files['wav']}>", "--image", files["png"],
            "--video", files["mp4"], "--json", "--max-new-tokens", "12"]
    runs = [subprocess.run(argv, check=False, capture_output=True, text=True, timeout=180, env=ENV, cwd=ROOT) for _ in range(2)]
    for run in runs:
        assert run.returncode == 0, run.stderr
    first, second = (json.loads(r.stdout) for r in runs)  # exactly one JSON document on stdout
    assert set(first) >= {"prompt", "answer", "tokens", "seconds", "prompt_tokens"}
    assert first["prompt"].startswith("What is shown?") and 0 < first["tokens"] <= 12
    assert (first["answer"], first["tokens"]) == (second["answer"], second["tokens"])
    # the same turn without the CLI and without streaming decodes to the same text
    model, processor = loaded
    session = ChatSession(model, processor, GenerationSettings(max_new_tokens=12))
    session.attach("image", files["png"])
    session.attach("video", files["mp4"])
    inputs = session.model_inputs([session.user_message(first["prompt"])])
    ids = model.generate(**inputs, generation_config=session.generation_config())[0, inputs["input_ids"].shape[1]:]
    assert processor.tokenizer.decode(ids, skip_special_tokens=True) == first["answer"]
    assert first["prompt_tokens"] == inputs["input_ids"].shape[1]


def test_piped_session_history_attachments_set_clear_errors(files):
    lines = [
        "Describe the image.",
        f"/image {files['png']}", f"/audio {files['wav']}", f"/video {files['frames']}", f"/video {files['mp4']}",
        f"and this <image:{files['png']}> too",
        "/set max_new_tokens=3",
        "third turn",
        f"/image {files['bad_png']}", f"/video {files['cut_mp4']}", f"/audio {files['txt']}", "/set top_p=2",
        f"broken <video:{files['txt']}> inline",
        "still here",
        "/clear",
        "Describe the image.",
        "/exit",
        "never answered",
    ]
    raw = subprocess.run([*CHAT, files["model"], "--json", "--show-prompt", "--max-new-tokens", "10"],
                         input=("\n".join(lines) + "\n").encode(), check=False, capture_output=True, timeout=180,
                         env=ENV, cwd=ROOT)
    # bytes, decoded by hand: text mode would turn a "\r" inside a random model's answer into "\n"
    run = subprocess.CompletedProcess(raw.args, raw.returncode, raw.stdout.decode("utf-8", "replace"),
                                      raw.stderr.decode("utf-8", "replace"))
    assert run.returncode == 0, run.stderr
    answers = [json.loads(line) for line in run.stdout.splitlines()]  # --json: stdout holds only answers
    assert [a["prompt"] for a in answers] == ["Describe the image.", f"and this <image:{files['png']}> too",
                                              "third turn", "still here", "Describe the image."]
    prompts = prompt_blocks(run.stderr)
    assert len(prompts) == len(answers)
    # multi-turn: each prompt is the previous one + its answer + the new user turn
    for i in (1, 2, 3):
        assert prompts[i].startswith(prompts[i - 1] + answers[i - 1]["answer"] + "<|im_end|>\n<|im_start|>user\n")
        assert answers[i]["prompt_tokens"] > answers[i - 1]["prompt_tokens"] + answers[i - 1]["tokens"] - 2
    # attachments: four pending ones before the text, one inline in place; each is one placeholder in the template
    assert "<|image|><|audio|><|video|><|video|>and this <|image|> too<|im_end|>" in prompts[1]
    assert answers[1]["prompt_tokens"] > answers[0]["prompt_tokens"] + 50  # the media expanded to many tokens
    # /set max_new_tokens=3 holds for every later answer
    assert answers[0]["tokens"] == answers[1]["tokens"] == 10
    assert all(0 < a["tokens"] <= 3 for a in answers[2:])
    # every bad file or setting is a named error, and the conversation went on without them
    for path, reason in [(files["bad_png"], "does not decode"), (files["cut_mp4"], "truncated"),
                         (files["txt"], "unsupported audio extension"), (files["txt"], "unsupported video extension")]:
        assert re.search(f"^error: {re.escape(path)}: .*{reason}", run.stderr, flags=re.MULTILINE), (path, run.stderr)
    assert "error: /set: top_p must be" in run.stderr
    assert "broken" not in prompts[3] and prompts[3].endswith("<|im_start|>user\nstill here<|im_end|>\n<|im_start|>assistant\n")
    assert prompts[3].count("<|image|>") == 2 and prompts[3].count("<|video|>") == 2
    # /clear: the same first turn renders and measures as at the start
    assert prompts[4] == prompts[0] and answers[4]["prompt_tokens"] == answers[0]["prompt_tokens"]
    assert "Traceback" not in run.stderr


class PtyChat:
    """`omni chat` on a pseudo-terminal that is its controlling terminal, so Ctrl-C (byte 0x03) raises SIGINT."""

    def __init__(self, argv: list[str]):
        self.master, slave = pty.openpty()
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 50, 400, 0, 0))  # wide: readline never wraps
        # a new session, then TIOCSCTTY makes the pty its controlling terminal (in the child, before exec)
        self.proc = subprocess.Popen([sys.executable, "-c", TAKE_TERMINAL_THEN_EXEC, *argv], stdin=slave,
                                     stdout=slave, stderr=slave, env={**ENV, "TERM": "dumb"}, cwd=ROOT,
                                     start_new_session=True)
        os.close(slave)
        self.output, self.seen = "", 0

    def expect(self, pattern: str, timeout: float = 60) -> str:
        """Wait until `pattern` shows up after the previous match; return the output in between."""
        deadline = time.monotonic() + timeout
        while True:
            match = re.compile(pattern).search(self.output, self.seen)
            if match:
                before, self.seen = self.output[self.seen:match.start()], match.end()
                return before
            left = deadline - time.monotonic()
            assert left > 0, f"timed out waiting for {pattern!r}; output so far:\n{self.output[-3000:]}"
            if select.select([self.master], [], [], min(left, 0.2))[0]:
                try:
                    data = os.read(self.master, 65536)
                except OSError:  # EIO: the child closed the terminal
                    data = b""
                assert data or self.proc.poll() is None, f"chat exited; waiting for {pattern!r}:\n{self.output[-3000:]}"
                self.output += data.decode("utf-8", "replace").replace("\r\n", "\n")

    def wait_for(self, pattern: str, timeout: float) -> bool:
        """Like `expect`, but False on timeout instead of failing."""
        try:
            self.expect(pattern, timeout)
        except AssertionError as exc:
            if "timed out" not in str(exc):
                raise
            return False
        return True

    def send(self, text: str) -> None:
        os.write(self.master, text.encode() + b"\r")

    def close(self) -> int | None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=30)
        os.close(self.master)
        return self.proc.returncode


def test_interactive_chat_through_a_pseudo_terminal(files):
    chat = PtyChat([*CHAT, files["model"], "--max-new-tokens", "6", "--show-prompt"])
    try:
        chat.expect(r">>> ", timeout=120)
        chat.send("/help")
        assert "/image PATH" in chat.expect(r">>> ") and "<image:PATH>" in chat.output
        chat.send("Describe the image.")
        first = chat.expect(r">>> ")
        chat.send(f"/image {files['png']}")
        assert "attached image" in chat.expect(r">>> ")
        chat.send("What is it?")
        second = chat.expect(r">>> ")
        assert second.count("<|im_start|>user") == 2 and "Describe the image.<|im_end|>" in second
        assert "<|image|>What is it?" in second and "<|image|>" not in first
        chat.send(f"/image {files['bad_png']}")
        assert f"error: {files['bad_png']}: " in chat.expect(r">>> ")
        # Ctrl-C stops a long answer, not the program
        chat.send("/set max_new_tokens=5000 min_new_tokens=5000")  # no early end of turn: only Ctrl-C stops it
        chat.expect(r">>> ")
        chat.send("Talk for a long time.")
        chat.expect(r"--- end of prompt ---\n")
        chat.expect(r"\S", timeout=60)  # the answer is streaming: the reading loop is running
        # one Ctrl-C is enough; a busy machine has been seen to lose one, so send another while none took effect
        # (a Ctrl-C arriving after the answer stopped lands at the prompt, which only reprompts)
        for _ in range(6):
            os.write(chat.master, b"\x03")
            if chat.wait_for(r"\[interrupted\]", timeout=10):
                break
        else:
            raise AssertionError(f"Ctrl-C never stopped the answer:\n{chat.output[-3000:]}")
        chat.expect(r">>> ")
        chat.send("/set max_new_tokens=4 min_new_tokens=0")
        chat.expect(r">>> ")
        chat.send("After the interruption?")
        after = chat.expect(r">>> ")
        assert after.count("<|im_start|>user") == 4 and "Talk for a long time.<|im_end|>" in after
        chat.send("/clear")
        assert "cleared" in chat.expect(r">>> ")
        chat.send("Describe the image.")
        assert chat.expect(r">>> ").count("<|im_start|>user") == 1
        os.write(chat.master, b"\x04")  # Ctrl-D (EOF) at an empty prompt quits cleanly; /exit: the piped test
        assert chat.proc.wait(timeout=30) == 0
    finally:
        chat.close()
    assert "Traceback" not in chat.output

