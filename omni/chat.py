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
import copy
import json
import signal
import sys
import threading
import time
from dataclasses import asdict, dataclass, fields

import torch

from omni.media_inputs import (
    MEDIA_KINDS,
    Attachment,
    AttachmentError,
    load_attachment,
    split_inline_markers,
)

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


class SettingError(ValueError):
    pass


def _parse_bool(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"expected true or false, got {text!r}")


# key -> (parse, is_valid, what a valid value is)
SETTING_RULES = {
    "max_new_tokens": (int, lambda v: v >= 1, "an integer >= 1"),
    "min_new_tokens": (int, lambda v: v >= 0, "an integer >= 0 (the end of turn is suppressed until then)"),
    "do_sample": (_parse_bool, lambda v: True, "true or false"),
    "temperature": (float, lambda v: v > 0, "a number > 0"),
    "top_p": (float, lambda v: 0 < v <= 1, "a number in (0, 1]"),
    "top_k": (int, lambda v: v >= 0, "an integer >= 0 (0 = no top-k)"),
    "repetition_penalty": (float, lambda v: v > 0, "a number > 0 (1 = none)"),
}
SAMPLING_ONLY = ("temperature", "top_p", "top_k")


@dataclass
class GenerationSettings:
    max_new_tokens: int = 256
    min_new_tokens: int = 0
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 50
    repetition_penalty: float = 1.0

    def updated(self, assignments: list[str]) -> GenerationSettings:
        """A copy with `key=value` assignments applied; all are checked before any applies (SettingError)."""
        changes = {}
        for item in assignments:
            key, sep, raw = item.partition("=")
            key = key.strip()
            if not sep or not raw.strip():
                raise SettingError(f"expected key=value, got {item!r}")
            if key not in SETTING_RULES:
                raise SettingError(f"unknown setting {key!r}; known: {', '.join(SETTING_RULES)}")
            parse, is_valid, wanted = SETTING_RULES[key]
            try:
                value = parse(raw.strip())
            except ValueError:
                raise SettingError(f"{key} must be {wanted}, got {raw.strip()!r}") from None
            if not is_valid(value):
                raise SettingError(f"{key} must be {wanted}, got {raw.strip()!r}")
            changes[key] = value
        return GenerationSettings(**{**asdict(self), **changes})

    def describe(self) -> str:
        return " ".join(f"{f.name}={getattr(self, f.name)}" for f in fields(self))

    def sampling_ignored(self) -> bool:
        """Sampling parameters were changed from their defaults while decoding is greedy."""
        defaults = GenerationSettings()
        return not self.do_sample and any(getattr(self, k) != getattr(defaults, k) for k in SAMPLING_ONLY)


@dataclass
class Answer:
    text: str
    tokens: int  # generated token ids, the end-of-turn token included
    seconds: float
    prompt_tokens: int  # the whole rendered history fed to the model this turn
    stop_reason: str  # "eos" | "length" | "interrupted"


class _StopWhenSet:
    """A stopping criterion that ends generation once `event` is set (Ctrl-C in the reading thread)."""

    def __init__(self, event: threading.Event):
        self.event = event

    def __call__(self, input_ids, scores, **kwargs):
        return torch.full((input_ids.shape[0],), self.event.is_set(), dtype=torch.bool, device=input_ids.device)


class ChatSession:
    """Conversation state (history + pending attachments) and one streamed answer per `ask`."""

    def __init__(self, model, processor, settings: GenerationSettings | None = None, system: str | None = None):
        self.model, self.processor = model, processor
        self.settings = settings or GenerationSettings()
        self.system = system
        self.history: list[dict] = []
        self.pending: list[Attachment] = []
        self.clear()

    def clear(self) -> None:
        self.history = [{"role": "system", "content": [{"type": "text", "text": self.system}]}] if self.system else []
        self.pending = []

    def attach(self, kind: str, path: str) -> Attachment:
        attachment = load_attachment(kind, path, self.processor)
        self.pending.append(attachment)
        return attachment

    def user_message(self, text: str) -> dict:
        """Pending attachments first, then the text with its inline markers decoded in place (AttachmentError)."""
        parts = [self._media_part(a) for a in self.pending]
        for kind, value in split_inline_markers(text):
            if kind == "text":
                parts.append({"type": "text", "text": value})
            else:
                parts.append(self._media_part(load_attachment(kind, value, self.processor)))
        return {"role": "user", "content": parts}

    @staticmethod
    def _media_part(attachment: Attachment) -> dict:
        # The media ride in the part itself (the processor's apply_chat_template convention), so the history keeps
        # them in part order; `fps` is ours and ignored by the template.
        return {"type": attachment.kind, attachment.kind: attachment.data, "fps": attachment.fps}

    def render(self, conversation: list[dict] | None = None) -> str:
        """The chat-template text of `conversation` (default: the history) plus the assistant prompt; media show as
        one placeholder each."""
        return self.processor.apply_chat_template(self.history if conversation is None else conversation,
                                                  add_generation_prompt=True)

    def model_inputs(self, conversation: list[dict]):
        media: dict[str, list] = {kind: [] for kind in MEDIA_KINDS}
        video_fps = []
        for message in conversation:
            for part in message["content"]:
                if part["type"] in media:
                    media[part["type"]].append(part[part["type"]])
                    if part["type"] == "video":
                        video_fps.append(part["fps"] or self.processor.video_fps)
        inputs = self.processor([conversation], images=media["image"] or None, videos=media["video"] or None,
                                audios=media["audio"] or None, video_fps=video_fps or None,
                                add_generation_prompt=True, return_labels=False, padding_side="left")
        return inputs.to(self.model.get_input_embeddings().weight.device)

    def generation_config(self):
        config = copy.deepcopy(self.model.generation_config)
        values = asdict(self.settings)
        if not self.settings.do_sample:  # greedy: neutral sampling values, so transformers has nothing to warn about
            values.update(temperature=1.0, top_p=1.0, top_k=50)
        # A media placeholder is an input slot, never text: generated, it would reach the model on the next step
        # with no media to fill it (an error), so the answer may not contain one.
        placeholders = [getattr(self.model.config, f"{kind}_token_id", None) for kind in MEDIA_KINDS]
        suppressed = set(config.suppress_tokens or []) | {i for i in placeholders if i is not None}
        config.update(**values, suppress_tokens=sorted(suppressed) or None)
        return config

    def ask(self, text: str, on_text=lambda chunk: None, on_prompt=None) -> Answer:
        """Answer `text` (with the pending attachments), streaming decoded text to `on_text` as it comes. The turn
        joins the history only when an answer (possibly interrupted) came back; errors leave the state unchanged."""
        from transformers import StoppingCriteriaList, TextIteratorStreamer

        message = self.user_message(text)
        conversation = [*self.history, message]
        inputs = self.model_inputs(conversation)
        if on_prompt is not None:
            on_prompt(self.render(conversation))
        streamer = TextIteratorStreamer(self.processor.tokenizer, skip_prompt=True, skip_special_tokens=True)
        stop, outcome = threading.Event(), {}

        def generate():
            try:
                outcome["ids"] = self.model.generate(
                    **inputs, generation_config=self.generation_config(), streamer=streamer,
                    stopping_criteria=StoppingCriteriaList([_StopWhenSet(stop)]))
            except Exception as exc:  # noqa: BLE001 - re-raised in the calling thread after join
                outcome["error"] = exc
                streamer.end()  # unblock the reader

        chunks, interrupted = [], False
        start = time.perf_counter()
        worker = threading.Thread(target=generate, name="omni-chat-generate", daemon=True)
        worker.start()
        try:
            for chunk in streamer:
                chunks.append(chunk)
                on_text(chunk)
        except KeyboardInterrupt:
            interrupted = True
            stop.set()
        finally:
            worker.join()
        seconds = time.perf_counter() - start
        if "error" in outcome:
            raise outcome["error"]
        prompt_tokens = inputs["input_ids"].shape[1]
        generated = outcome["ids"][0, prompt_tokens:]
        eos = self.model.generation_config.eos_token_id
        eos_ids = set(eos if isinstance(eos, list) else [eos]) - {None}
        if interrupted:
            reason = "interrupted"
        elif len(generated) and int(generated[-1]) in eos_ids:
            reason = "eos"
        else:
            reason = "length"
        answer = Answer("".join(chunks), len(generated), seconds, prompt_tokens, reason)
        # what the user saw is what the model remembers, an interrupted answer included
        self.history += [message, {"role": "assistant", "content": [{"type": "text", "text": answer.text}]}]
        self.pending = []
        return answer


# ---------------------------------------------------------------------- the command line
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


def load_for_chat(path: str, device: str | None = None, dtype: str = "auto", tokenizer: str | None = None,
                  trust_remote_code: bool = False):
    """(model, processor) on `device`; a bare "cuda" spreads the model over the GPUs with accelerate."""
    from omni.loading import load_model_and_processor

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if dtype == "auto":
        use_bf16 = device.startswith("cuda") and torch.cuda.is_bf16_supported()
        torch_dtype = torch.bfloat16 if use_bf16 else torch.float32
    else:
        torch_dtype = getattr(torch, dtype)
    model, processor = load_model_and_processor(path, dtype=torch_dtype, tokenizer=tokenizer,
                                                trust_remote_code=trust_remote_code)
    if device == "cuda":
        from accelerate import dispatch_model, infer_auto_device_map

        device_map = infer_auto_device_map(model, no_split_module_classes=model._no_split_modules, dtype=torch_dtype)
        model = dispatch_model(model, device_map=device_map)
    else:
        model.to(device)
    return model.eval(), processor


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
