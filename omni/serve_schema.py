"""The OpenAI chat-completions wire format `omni serve` speaks: request models (pydantic), response bodies, errors.

Requests follow OpenAI's `POST /v1/chat/completions`: `messages` whose `content` is a string or a list of parts
(`text`, `image_url`, `input_audio`, and vLLM's `video_url`), plus the generation parameters listed in
`ChatCompletionRequest`. Every error goes back as OpenAI's error object
`{"error": {"message", "type", "param", "code"}}` (`ApiError.body`).
"""

from __future__ import annotations

import time
import uuid
from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

MAX_STOP_SEQUENCES = 4  # OpenAI's limit


class ApiError(Exception):
    """An error answered to the client: HTTP status + OpenAI's error object (no traceback ever reaches it)."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


# ------------------------------------------------------------------------------------------------ request parts
class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class ImageURL(_Strict):
    url: str
    detail: Literal["auto", "low", "high"] | None = None  # accepted for compatibility; the processor has one size


class ImagePart(_Strict):
    type: Literal["image_url"]
    image_url: ImageURL


class InputAudio(_Strict):
    data: str  # base64
    format: Literal["wav", "flac", "mp3"]


class AudioPart(_Strict):
    type: Literal["input_audio"]
    input_audio: InputAudio


class VideoURL(_Strict):
    url: str


class VideoPart(_Strict):
    type: Literal["video_url"]
    video_url: VideoURL


ContentPart = Annotated[Union[TextPart, ImagePart, AudioPart, VideoPart], Field(discriminator="type")]
MEDIA_PART_TYPES = {"image_url": "image", "input_audio": "audio", "video_url": "video"}


class Message(_Strict):
    # "developer" is OpenAI's newer name for the system role
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[ContentPart]
    name: str | None = None  # accepted and ignored (the chat template has no speaker names)


class StreamOptions(_Strict):
    include_usage: bool = False


class ChatCompletionRequest(_Strict):
    """The parameters we implement. Unknown fields are rejected (naming them) rather than silently ignored."""

    model: str
    messages: list[Message] = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0, le=2)  # 0 = greedy; None = the model's generation config
    top_p: float | None = Field(default=None, gt=0, le=1)
    stop: str | list[str] | None = None
    seed: int | None = None
    n: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None  # an end-user id for the caller's own bookkeeping; not used

    @field_validator("stop")
    @classmethod
    def _stop_sequences(cls, value):
        stops = [value] if isinstance(value, str) else list(value or [])
        if len(stops) > MAX_STOP_SEQUENCES:
            raise ValueError(f"at most {MAX_STOP_SEQUENCES} stop sequences, got {len(stops)}")
        if any(not s for s in stops):
            raise ValueError("stop sequences must be non-empty strings")
        return stops

    def token_limit(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


def _location(loc: tuple) -> str:
    """pydantic's error location -> OpenAI's `param` style: messages[0].content[1].image_url.url"""
    out, previous = "", None
    for item in loc:
        if isinstance(item, int):
            out += f"[{item}]"
        elif item in ("str", "function-after[_stop_sequences(), union[str,list[str],none]]") or "[" in item:
            continue  # the union branch pydantic tried, not a field name
        elif previous is not None and isinstance(previous, int) and item in MEDIA_PART_TYPES | {"text": None}:
            pass  # a discriminated union's tag right after the part index: the field name follows
        else:
            out += f".{item}" if out else str(item)
        previous = item
    return out


def parse_request(payload: Any) -> ChatCompletionRequest:
    """Validate a decoded JSON body; ApiError(400) names the first offending field and the reason."""
    if not isinstance(payload, dict):
        raise ApiError(400, f"the request body must be a JSON object, got {type(payload).__name__}")
    try:
        request = ChatCompletionRequest.model_validate(payload)
    except ValidationError as exc:
        # the deepest location is the most specific one (a `str | list` union reports both branches)
        first = max(exc.errors(include_url=False), key=lambda e: len(e["loc"]))
        param = _location(tuple(first["loc"]))
        if first["type"] == "extra_forbidden":
            message = f"unknown or unsupported parameter {param!r}"
        else:
            message = f"{param}: {first['msg']}" if param else first["msg"]
        more = len(exc.errors()) - 1
        raise ApiError(400, message + (f" (and {more} more problem(s))" if more else ""), param=param or None,
                       code="invalid_value") from None
    if request.n not in (None, 1):
        raise ApiError(400, f"n: only n=1 is supported, got {request.n}", param="n", code="invalid_value")
    if request.stream_options is not None and not request.stream:
        raise ApiError(400, "stream_options: only allowed with stream=true", param="stream_options",
                       code="invalid_value")
    return request


# ------------------------------------------------------------------------------------------------ responses
def completion_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def completion_body(cid: str, model: str, text: str, finish_reason: str, prompt_tokens: int,
                    completion_tokens: int) -> dict:
    return {"id": cid, "object": "chat.completion", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                         "finish_reason": finish_reason}],
            "usage": usage(prompt_tokens, completion_tokens)}


def chunk_body(cid: str, model: str, created: int, delta: dict | None, finish_reason: str | None = None,
               usage_counts: dict | None = None) -> dict:
    """One `chat.completion.chunk`; `delta=None` makes the usage-only chunk (empty choices) of include_usage."""
    body: dict[str, Any] = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model}
    body["choices"] = [] if delta is None else [{"index": 0, "delta": delta, "logprobs": None,
                                                 "finish_reason": finish_reason}]
    if usage_counts is not None:
        body["usage"] = usage_counts
    return body


def models_body(model: str, created: int) -> dict:
    return {"object": "list", "data": [{"id": model, "object": "model", "created": created, "owned_by": "omni"}]}


__all__ = ["ApiError", "ChatCompletionRequest", "MEDIA_PART_TYPES", "Message", "chunk_body", "completion_body",
           "completion_id", "models_body", "parse_request", "usage"]
