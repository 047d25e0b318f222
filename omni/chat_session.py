"""The conversation behind `omni chat`: generation settings, the history with its media, one streamed answer per turn.

`ChatSession` renders the whole history through the processor's chat template every turn and streams the answer as
it is generated (`TextIteratorStreamer`, generation in a thread; Ctrl-C in the reading thread stops it). Decoding is
greedy unless `do_sample=true`, so answers are reproducible. `load_for_chat` loads a model folder or a training
checkpoint for it. The command line around it is `omni/chat.py`.
"""

from __future__ import annotations

import copy
import threading
import time
from dataclasses import asdict, dataclass, fields

import torch

from omni.media_inputs import MEDIA_KINDS, Attachment, load_attachment, split_inline_markers


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


__all__ = ["Answer", "ChatSession", "GenerationSettings", "SAMPLING_ONLY", "SETTING_RULES", "SettingError",
           "load_for_chat"]
