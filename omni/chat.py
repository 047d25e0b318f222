"""`omni chat`: talk to a model in the terminal, with images, audio and video attached by path.

    omni chat PATH                                        # interactive; /help lists the commands
    omni chat PATH -p "What is shown?" --image x.png      # one-shot: print the answer and exit
    omni chat PATH -p "..." --audio a.wav --video v.mp4 --json   # one JSON object per answer, for scripts

PATH is an exported model folder (`omni train` writes one per stage at OUTPUT/<stage>/model) or a training
checkpoint, read by `omni.loading.load_model_and_processor`. The whole history goes through the processor's chat
template every turn and the answer streams as it is generated (`TextIteratorStreamer`, generation in a thread).
Decoding is greedy unless `do_sample=true`, so answers are reproducible. Ctrl-C stops the current answer; Ctrl-D or
/exit quits. On a GPU the model is placed with accelerate's `device_map="auto"`.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys

# ChatSession and load_for_chat are imported from here by omni/run_summary.py and the tests: this module is the
# command's public face, omni/chat_session.py holds the conversation itself.
from omni.chat_session import (
    SETTING_RULES,
    Answer,
    ChatSession,
    GenerationSettings,
    SettingError,
    load_for_chat,
)
from omni.media_inputs import MEDIA_KINDS, AttachmentError

PROMPT = ">>> "
HELP = """\
Type a message and press Enter; the answer streams back. The conversation is remembered until /clear.
  /image PATH        attach an image (png, jpg, ...) to your next message; several attachments are allowed
  /audio PATH        attach audio (wav, flac, ...; resampled to the model's rate)
  /video PATH        attach a video: an .mp4/.webm/... file or a folder of frame images
  <image:PATH>       inline attachment at that place in a message, also <audio:PATH> and <video:PATH>
                     (PATH may contain spaces but not '<' or '>'); /image etc. attachments go before the text
  /clear             forget the conversation and any pending attachments
  /set KEY=VALUE ... change generation settings; /set alone shows them.
                     Keys: {keys}
                     (temperature, top_p and top_k only matter with do_sample=true; the default is greedy)
  /help              this text
  /exit              quit (also Ctrl-D); Ctrl-C stops the answer being generated
  //text             send a message that starts with '/'
"""


def add_parser(sub) -> None:
    p = sub.add_parser("chat", help="chat with a model (exported folder or training checkpoint); media by path",
                       description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("path", metavar="PATH", help="an exported model folder or a training checkpoint")
    p.add_argument("-p", "--prompt", help="one-shot: answer this message, print the answer and exit")
    for kind in MEDIA_KINDS:
        extra = " (a file or a folder of frame images)" if kind == "video" else ""
        p.add_argument(f"--{kind}", action="append", default=[], metavar="PATH",
                       help=f"attach a {kind}{extra} to the first message; repeatable")
    p.add_argument("--system", help="a system message that starts the conversation (kept across /clear)")
    p.add_argument("--json", action="store_true",
                   help='print one JSON object per answer: {"prompt", "answer", "tokens", "seconds", '
                        '"prompt_tokens", "stop_reason"}; other messages go to stderr')
    p.add_argument("--show-prompt", action="store_true",
                   help="print the rendered chat-template prompt (whole history) to stderr before each answer")
    defaults = GenerationSettings()
    for name, (_, _, wanted) in SETTING_RULES.items():
        if name == "do_sample":
            p.add_argument("--do-sample", action="store_true", help="sample instead of greedy decoding")
            continue
        p.add_argument(f"--{name.replace('_', '-')}", dest=name, default=getattr(defaults, name),
                       help=f"{wanted}; default {getattr(defaults, name)}")
    p.add_argument("--device", default=None,
                   help="cuda, cuda:N or cpu; default cuda if available else cpu (plain 'cuda' = device_map auto)")
    p.add_argument("--tokenizer", metavar="FOLDER",
                   help="tokenizer folder for a training checkpoint moved out of its run folder")
    p.add_argument("--trust-remote-code", action="store_true",
                   help="let the model folder's own .py files (its auto_map) load the processor; off by default: a folder is read with this package's classes and none of its code runs")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="weights dtype; auto = bfloat16 on a GPU that supports it, else float32")
    p.set_defaults(handler=run)


def _settings_from_args(args) -> GenerationSettings:
    assignments = [f"{name}={getattr(args, name)}" for name in SETTING_RULES if name != "do_sample"]
    return GenerationSettings().updated([*assignments, f"do_sample={args.do_sample}"])


def _error(text: str) -> None:
    print(f"error: {text}", file=sys.stderr, flush=True)


class _Terminal:
    """Prints answers (streamed text or JSON lines) and messages for one run of the command."""

    def __init__(self, args):
        self.json, self.show_prompt = args.json, args.show_prompt
        self.info_stream = sys.stderr if args.json else sys.stdout  # --json: stdout holds only the answers

    def info(self, text: str) -> None:
        print(text, file=self.info_stream, flush=True)

    def answer(self, session: ChatSession, text: str) -> Answer | None:
        """Ask and print; errors print `error: ...` and return None (the conversation goes on)."""
        def stream(chunk):
            sys.stdout.write(chunk)
            sys.stdout.flush()

        def prompt(rendered):
            print(f"--- prompt ---\n{rendered}\n--- end of prompt ---", file=sys.stderr, flush=True)

        try:
            answer = session.ask(text, on_text=(lambda chunk: None) if self.json else stream,
                                 on_prompt=prompt if self.show_prompt else None)
        except AttachmentError as exc:
            _error(str(exc))
            return None
        except (ValueError, RuntimeError) as exc:  # e.g. over the processor's max_length, out of memory
            # attachments that broke the turn would break every retry: drop them (the user can attach again)
            dropped = f" (dropped its {len(session.pending)} pending attachment(s))" if session.pending else ""
            session.pending = []
            _error(f"this turn failed: {exc}{dropped}")
            return None
        if self.json:
            print(json.dumps({"prompt": text, "answer": answer.text, "tokens": answer.tokens,
                              "seconds": round(answer.seconds, 4), "prompt_tokens": answer.prompt_tokens,
                              "stop_reason": answer.stop_reason}, ensure_ascii=False), flush=True)
        else:
            sys.stdout.write("\n" if answer.stop_reason != "interrupted" else " [interrupted]\n")
            sys.stdout.flush()
        return answer


def handle_line(line: str, session: ChatSession, terminal: _Terminal) -> bool:
    """Run one input line (a command or a message); False when the user asked to quit."""
    text = line.strip()
    if not text:
        return True
    if text.startswith("//"):
        text = text[1:]
    elif text.startswith("/"):
        command, _, rest = text.partition(" ")
        rest = rest.strip()
        if command in ("/exit", "/quit"):
            return False
        if command == "/help":
            terminal.info(HELP.format(keys=", ".join(SETTING_RULES)).rstrip())
        elif command == "/clear":
            session.clear()
            terminal.info("cleared the conversation and pending attachments")
        elif command == "/set":
            try:
                session.settings = session.settings.updated(rest.split()) if rest else session.settings
            except SettingError as exc:
                _error(f"/set: {exc}")
                return True
            terminal.info(session.settings.describe())
            if session.settings.sampling_ignored():
                terminal.info("note: do_sample=false (greedy), so temperature/top_p/top_k have no effect; "
                              "/set do_sample=true to sample")
        elif command.removeprefix("/") in MEDIA_KINDS:
            path = rest.strip("\"'")
            if not path:
                _error(f"usage: {command} PATH")
                return True
            try:
                attachment = session.attach(command.removeprefix("/"), path)
            except AttachmentError as exc:
                _error(str(exc))
                return True
            terminal.info(f"attached {attachment.describe()} to your next message ({len(session.pending)} pending)")
        else:
            _error(f"unknown command {command} (/help lists the commands; start with // to send a leading /)")
        return True
    terminal.answer(session, text)
    return True


def interactive(session: ChatSession, terminal: _Terminal) -> int:
    # A process started with SIGINT ignored (nohup, some launchers and job runners) keeps ignoring it, and Ctrl-C
    # could then never stop an answer: take the signal back (Python's own handler raises KeyboardInterrupt).
    signal.signal(signal.SIGINT, signal.default_int_handler)
    tty = sys.stdin.isatty()
    if tty:
        import readline  # noqa: F401  (line editing and history for input())
    terminal.info("omni chat: /help for commands, /exit or Ctrl-D to quit")
    while True:
        try:
            line = input(PROMPT if tty else "")
        except EOFError:
            if tty:
                print()
            return 0
        except KeyboardInterrupt:
            print("\n(Ctrl-D or /exit quits)", flush=True)
            continue
        try:
            if not handle_line(line, session, terminal):
                return 0
        except KeyboardInterrupt:  # Ctrl-C outside generation (e.g. while decoding a video): drop this line
            print("\n[interrupted]", flush=True)


def run(args: argparse.Namespace, rest: list[str] | None = None) -> int:
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    try:
        settings = _settings_from_args(args)
    except SettingError as exc:
        _error(str(exc))
        return 2
    terminal = _Terminal(args)
    try:
        model, processor = load_for_chat(args.path, args.device, args.dtype, args.tokenizer,
                                         trust_remote_code=args.trust_remote_code)
    except (OSError, ValueError, KeyError, RuntimeError) as exc:  # missing/unverifiable model: say why, no traceback
        _error(exc.args[0] if isinstance(exc, KeyError) and exc.args else str(exc))
        return 1
    session = ChatSession(model, processor, settings, system=args.system)
    if settings.sampling_ignored():
        terminal.info("note: greedy decoding (no --do-sample), so --temperature/--top-p/--top-k have no effect")
    for kind in MEDIA_KINDS:
        for path in getattr(args, kind):
            try:
                session.attach(kind, path)
            except AttachmentError as exc:
                _error(str(exc))
                return 1
    if args.prompt is None:
        return interactive(session, terminal)
    try:
        answer = terminal.answer(session, args.prompt)
    except KeyboardInterrupt:
        return 130
    if answer is None:
        return 1
    return 130 if answer.stop_reason == "interrupted" else 0


__all__ = ["Answer", "ChatSession", "GenerationSettings", "SettingError", "add_parser", "load_for_chat", "run"]
