"""Request messages -> the processor's conversation + decoded media, for `omni serve`, with every check a request can
fail named in a 4xx `ApiError`.

Media come as `data:` URLs / base64 (decoded with `omni_moe.data.media`, the decoders training and `omni chat` use, so
their bounds apply here too) or, only when the server was started with `--media-root DIR`, as files under DIR
(`file:///abs/path` or a path relative to DIR; read with `omni.media_inputs.load_attachment`, as `omni chat` reads
them). Remote URLs are never fetched: the server may run on an offline machine and must not become a proxy.
"""

from __future__ import annotations

import base64
import binascii
import re
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import unquote

from omni_moe.data.media import decode_audio, decode_image, decode_video_container
from omni_moe.data.quality import MediaDecoderUnavailable, SampleRejected
from omni.media_inputs import BUFFER_REPR, AttachmentError, load_attachment
from omni.serve_schema import MEDIA_PART_TYPES, ApiError, ChatCompletionRequest

DATA_URL = re.compile(r"^data:(?P<mime>[\w.+-]+/[\w.+-]+)?(?P<params>(;[\w.+-]+=[\w.+-]+)*)(?P<b64>;base64)?,",
                      re.IGNORECASE)
IMAGE_MIME = {"image/png", "image/jpeg", "image/jpg", "image/webp", "image/gif"}


@dataclass(frozen=True)
class InputLimits:
    max_media_bytes: int  # one medium, decoded (a base64 string of 4n/3 chars), or one file / frame folder
    max_media_items: int  # media parts in one request
    media_root: Path | None  # resolved; None = requests may not name local files


@dataclass
class Prompt:
    """A validated conversation in the processor's format, its media in part order."""

    conversation: list[dict]
    images: list = field(default_factory=list)
    videos: list = field(default_factory=list)
    audios: list = field(default_factory=list)
    video_fps: list = field(default_factory=list)

    def processor_kwargs(self, default_fps: float) -> dict:
        """Keyword arguments of the processor's call; a video without a frame rate (frames) gets `default_fps`."""
        fps = [rate or default_fps for rate in self.video_fps]
        return {"images": self.images or None, "videos": self.videos or None, "audios": self.audios or None,
                "video_fps": fps or None}


def _decode_base64(text: str, param: str, limits: InputLimits) -> bytes:
    compact = "".join(text.split())
    estimated = len(compact) * 3 // 4
    if estimated > limits.max_media_bytes:
        raise ApiError(400, f"{param}: the medium is about {estimated} bytes, over the server's limit of "
                            f"{limits.max_media_bytes} bytes", param=param, code="media_too_large")
    try:
        data = base64.b64decode(compact, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ApiError(400, f"{param}: not valid base64 ({exc})", param=param, code="invalid_base64") from None
    if not data:
        raise ApiError(400, f"{param}: empty medium", param=param, code="invalid_media")
    return data


def _media_error(param: str, exc: Exception) -> ApiError:
    detail = exc.detail if isinstance(exc, SampleRejected) else str(exc)
    # decoders read from memory; PIL names the buffer object, which tells the client nothing
    return ApiError(400, f"{param}: {BUFFER_REPR.sub('', detail)}", param=param, code="invalid_media")


def _local_path(url: str, param: str, limits: InputLimits) -> tuple[str, Path]:
    """(the name the client gave, the resolved path inside --media-root)."""
    if re.match(r"^[a-z][a-z0-9+.-]*://", url, re.IGNORECASE) and not url.lower().startswith("file://"):
        raise ApiError(400, f"{param}: remote URLs are not fetched; send a data: URL (base64) or, when the server "
                            "has --media-root, a file under it", param=param, code="unsupported_url")
    given = unquote(url[len("file://"):]) if url.lower().startswith("file://") else url
    if limits.media_root is None:
        raise ApiError(400, f"{param}: local files are off on this server (start it with --media-root DIR); send a "
                            "data: URL instead", param=param, code="local_files_disabled")
    try:
        path = (limits.media_root / given).resolve()  # an absolute `given` replaces the root, then must be inside
        inside = path.is_relative_to(limits.media_root)
        exists = inside and path.exists()
        if exists:
            size = sum(f.stat().st_size for f in path.iterdir() if f.is_file()) if path.is_dir() else \
                path.stat().st_size
    except (OSError, ValueError) as exc:  # a NUL byte, a name too long, a folder we may not read
        raise ApiError(400, f"{param}: {given!r} is not a usable path ({type(exc).__name__})", param=param,
                       code="invalid_media") from None
    if not inside:
        raise ApiError(403, f"{param}: {given!r} is outside the server's media root", type="permission_error",
                       param=param, code="path_outside_media_root")
    if not exists:
        raise ApiError(400, f"{param}: {given!r}: no such file or folder under the media root", param=param,
                       code="invalid_media")
    if size > limits.max_media_bytes:
        raise ApiError(400, f"{param}: {given!r} is {size} bytes, over the server's limit of "
                            f"{limits.max_media_bytes} bytes", param=param, code="media_too_large")
    return given, path


def _from_file(kind: str, url: str, param: str, limits: InputLimits, processor, prompt: Prompt) -> None:
    given, path = _local_path(url, param, limits)
    try:
        attachment = load_attachment(kind, path, processor)
    except AttachmentError as exc:  # names our resolved path; answer with the client's own name
        raise ApiError(400, f"{param}: {given!r}: {exc.reason}", param=param, code="invalid_media") from None
    _append(prompt, kind, attachment.data, attachment.fps)


def _append(prompt: Prompt, kind: str, data, fps: float | None = None) -> None:
    if kind == "image":
        prompt.images.append(data)
    elif kind == "audio":
        prompt.audios.append(data)
    else:
        prompt.videos.append(data)
        prompt.video_fps.append(fps)


def _data_url(url: str, param: str, limits: InputLimits) -> tuple[str, bytes]:
    match = DATA_URL.match(url)
    if match is None or not match.group("b64"):
        raise ApiError(400, f"{param}: expected a base64 data: URL (data:<mime>;base64,<data>)", param=param,
                       code="invalid_media")
    return (match.group("mime") or "").lower(), _decode_base64(url[match.end():], param, limits)


def _media_part(part, kind: str, param: str, limits: InputLimits, processor, prompt: Prompt) -> None:
    if kind in ("image", "video") and getattr(processor, "image_processor", None) is None:
        raise ApiError(400, f"{param}: this model takes no {kind}s (it has no vision encoder)", param=param,
                       code="unsupported_media")
    extractor = getattr(processor, "feature_extractor", None)
    if kind == "audio" and extractor is None:
        raise ApiError(400, f"{param}: this model takes no audio (it has no audio encoder)", param=param,
                       code="unsupported_media")
    try:
        if kind == "audio":
            data = _decode_base64(part.input_audio.data, f"{param}.input_audio.data", limits)
            samples, _ = decode_audio(data, "the audio", target_rate=extractor.sampling_rate)
            _append(prompt, kind, samples)
            return
        url_param = f"{param}.{'image_url' if kind == 'image' else 'video_url'}.url"
        url = part.image_url.url if kind == "image" else part.video_url.url
        if not url.lower().startswith("data:"):
            _from_file(kind, url, url_param, limits, processor, prompt)
            return
        mime, data = _data_url(url, url_param, limits)
        if kind == "image":
            if mime not in IMAGE_MIME:
                raise ApiError(400, f"{url_param}: unsupported image type {mime or 'none'!r} (supported: "
                                    f"{', '.join(sorted(IMAGE_MIME))})", param=url_param, code="unsupported_media")
            _append(prompt, kind, decode_image(data, "the image"))
        else:
            if not mime.startswith("video/"):
                raise ApiError(400, f"{url_param}: expected a video/* data: URL, got {mime or 'none'!r}",
                               param=url_param, code="unsupported_media")
            frames, fps = decode_video_container(data, "the video")
            _append(prompt, kind, frames, fps)
    except (SampleRejected, MediaDecoderUnavailable) as exc:
        raise _media_error(param, exc) from None
    except (ValueError, OSError) as exc:  # a decoder's own bound or a library error: still the medium's fault
        raise ApiError(400, f"{param}: the medium was refused ({type(exc).__name__}: {exc})", param=param,
                       code="invalid_media") from None


def build_prompt(request: ChatCompletionRequest, processor, limits: InputLimits) -> Prompt:
    """The request's messages in the processor's format with decoded media (ApiError on any bad part)."""
    prompt = Prompt(conversation=[])
    media_count = sum(1 for m in request.messages if not isinstance(m.content, str)
                      for p in m.content if p.type in MEDIA_PART_TYPES)
    if media_count > limits.max_media_items:
        raise ApiError(400, f"messages: {media_count} media parts, more than this server takes per request "
                            f"({limits.max_media_items})", param="messages", code="too_many_media")
    for i, message in enumerate(request.messages):
        role = "system" if message.role == "developer" else message.role
        if isinstance(message.content, str):
            prompt.conversation.append({"role": role, "content": [{"type": "text", "text": message.content}]})
            continue
        parts = []
        for j, part in enumerate(message.content):
            param = f"messages[{i}].content[{j}]"
            if part.type == "text":
                parts.append({"type": "text", "text": part.text})
                continue
            kind = MEDIA_PART_TYPES[part.type]
            if role != "user":
                raise ApiError(400, f"{param}: media parts are only allowed in user messages, not {message.role}",
                               param=param, code="invalid_value")
            _media_part(part, kind, param, limits, processor, prompt)
            parts.append({"type": kind})
        prompt.conversation.append({"role": role, "content": parts})
    if prompt.conversation[-1]["role"] == "assistant":
        raise ApiError(400, "messages: the last message must not be the assistant's (continuing a partial answer "
                            "is not supported)", param="messages", code="invalid_value")
    return prompt


def count_prompt_tokens(prompt: Prompt, processor) -> int:
    """Tokens of the rendered prompt (media placeholders included); ApiError(400) when the processor refuses it."""
    try:
        inputs = processor([prompt.conversation], **prompt.processor_kwargs(processor.video_fps),
                           add_generation_prompt=True, return_labels=False)
    except (ValueError, TypeError) as exc:
        raise ApiError(400, f"messages: {exc}", param="messages", code="invalid_value") from None
    return int(inputs["input_ids"].shape[1])


__all__ = ["InputLimits", "Prompt", "build_prompt", "count_prompt_tokens"]
