"""`omni serve`: an OpenAI-compatible chat server (FastAPI + uvicorn) with streaming, media and a web chat page.

    omni serve PATH                                   # http://127.0.0.1:8000 : the chat page at /, the API at /v1
    omni serve PATH --port 9000 --api-key KEY --media-root ./media --max-batch-size 16
    OMNI_API_KEY=KEY omni serve PATH --host 0.0.0.0   # a key from the environment (never printed or logged)

PATH is an exported model folder or a training checkpoint, loaded as `omni chat` loads it
(`omni.loading.load_model_and_processor`). Endpoints: `GET /health`, `GET /v1/models`, `POST /v1/chat/completions`
(OpenAI's request and response format, `stream: true` for Server-Sent Events ending in `data: [DONE]`), and the chat
page at `/` (static files shipped in omni/static, talking only to this API). With an API key every /v1 request needs
`Authorization: Bearer KEY`. Every bad request gets a 4xx with OpenAI's error object and the server goes on; a full
queue gets 503 with Retry-After. Request parsing and checks: omni/serve_schema.py, omni/serve_inputs.py; batching
and generation: omni/serve_engine.py.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hmac
import json
import logging
import os
import socket
import sys
import threading
import time
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, StreamingResponse
from fastapi.staticfiles import StaticFiles
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from omni.serve_engine import GenerationEngine, Job, QueueFull
from omni.serve_inputs import InputLimits, build_prompt
from omni.serve_schema import ApiError, chunk_body, completion_body, completion_id, models_body, parse_request, usage

log = logging.getLogger("omni.serve")
API_KEY_ENV = "OMNI_API_KEY"
MIB = 1 << 20


@dataclass(frozen=True)
class ServeSettings:
    model_name: str
    context_length: int
    limits: InputLimits
    max_body_bytes: int = 64 * MIB
    api_key: str | None = None
    retry_after_s: int = 1
    default_do_sample: bool = False  # the model's generation config, for requests that give no temperature
    default_temperature: float = 1.0
    default_top_p: float = 1.0


async def _read_body(request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise ApiError(413, f"the request body is {declared} bytes, over the server's limit of {limit} bytes",
                       code="request_too_large")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise ApiError(413, f"the request body is over the server's limit of {limit} bytes",
                           code="request_too_large")
        chunks.append(chunk)
    return b"".join(chunks)


def _job(request, prompt, prompt_tokens: int, settings: ServeSettings) -> Job:
    limit = request.token_limit()
    room = settings.context_length - prompt_tokens
    param = "max_completion_tokens" if request.max_completion_tokens is not None else "max_tokens"
    if room < 1 or (limit is not None and limit > room):
        asked = f"{prompt_tokens} in the messages" + (f" and {limit} in {param}" if limit is not None else "")
        raise ApiError(400, f"this model's maximum context length is {settings.context_length} tokens; the request "
                            f"has {asked}", param="messages" if room < 1 else param, code="context_length_exceeded")
    if request.temperature is None:
        do_sample, temperature = settings.default_do_sample, settings.default_temperature
    else:
        do_sample, temperature = request.temperature > 0, request.temperature
    top_p = request.top_p if request.top_p is not None else settings.default_top_p
    return Job(prompt, prompt_tokens, limit if limit is not None else room, do_sample=do_sample,
               temperature=temperature if do_sample else 1.0, top_p=top_p if do_sample else 1.0,
               seed=request.seed if do_sample else None, stop=list(request.stop or []))


class _Listener:
    """Carries the worker thread's events into the request's event loop."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop, self.queue = loop, asyncio.Queue()

    def __call__(self, kind: str, payload) -> None:
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, (kind, payload))
        except RuntimeError:  # the loop closed (server shutdown): nobody is listening
            pass


def create_app(engine: GenerationEngine, settings: ServeSettings) -> FastAPI:
    app = FastAPI(title="omni serve", docs_url=None, redoc_url=None, openapi_url=None)
    started = int(time.time())
    static = resources.files("omni") / "static"

    def error_response(exc: ApiError) -> JSONResponse:
        return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)

    @app.exception_handler(ApiError)
    async def _api_error(request, exc: ApiError):
        return error_response(exc)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request, exc):
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return error_response(ApiError(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}",
                                       type=kind))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request, exc):
        return error_response(ApiError(400, str(exc.errors()[0].get("msg", "invalid request"))))

    @app.exception_handler(Exception)
    async def _unexpected(request, exc):
        log.error("unexpected error on %s %s", request.method, request.url.path, exc_info=exc)
        return error_response(ApiError(500, "internal server error (see the server's log)", type="server_error"))

    def check_key(request: Request) -> None:
        if settings.api_key is None:
            return
        given = request.headers.get("authorization", "")
        scheme, _, token = given.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), settings.api_key.encode()):
            raise ApiError(401, "missing or incorrect API key: send 'Authorization: Bearer KEY'",
                           code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})

    @app.get("/health")
    async def health():
        return {"status": "ok", **engine.stats()}

    @app.get("/v1/models")
    async def list_models(request: Request):
        check_key(request)
        return models_body(settings.model_name, started)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        check_key(request)
        body = await _read_body(request, settings.max_body_bytes)
        try:
            payload = json.loads(body)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ApiError(400, f"the request body is not valid JSON ({exc})", code="invalid_json") from None
        parsed = parse_request(payload)
        if parsed.model != settings.model_name:
            raise ApiError(404, f"the model {parsed.model!r} does not exist; this server serves "
                                f"{settings.model_name!r}", param="model", code="model_not_found")

        def busy(reason: str) -> ApiError:
            return ApiError(503, f"the server is busy: {reason}; retry shortly", type="server_error",
                            code="server_overloaded", headers={"Retry-After": str(settings.retry_after_s)})

        if engine.queue_full():  # before decoding any media; submit() below is the authoritative check
            raise busy(f"the queue is full (--max-queue {engine.max_queue})")

        def prepare() -> Job:  # media decoding and tokenization: off the event loop
            prompt = build_prompt(parsed, engine.processor, settings.limits)
            return _job(parsed, prompt, engine.prompt_tokens(prompt), settings)

        job = await run_in_threadpool(prepare)
        listener = _Listener(asyncio.get_running_loop())
        try:
            engine.submit(job, listener)
        except QueueFull as exc:
            raise busy(str(exc)) from None
        cid = completion_id()
        if parsed.stream:
            include_usage = bool(parsed.stream_options and parsed.stream_options.include_usage)
            return StreamingResponse(_stream(engine, job, listener, cid, settings.model_name, include_usage),
                                     media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        return await _complete(engine, job, listener, request, cid, settings.model_name)

    @app.get("/", include_in_schema=False)
    async def page():
        return FileResponse(str(static / "index.html"))

    app.mount("/static", StaticFiles(directory=str(static)), name="static")
    return app


async def _complete(engine, job, listener, request, cid: str, model: str):
    """The whole answer as one chat.completion; stops the job if the client disconnects while waiting."""

    async def watch_disconnect():
        while not await request.is_disconnected():
            await asyncio.sleep(0.5)
        engine.cancel(job)
        listener("cancelled", None)

    watcher = asyncio.create_task(watch_disconnect())
    text = []
    try:
        while True:
            kind, payload = await listener.queue.get()
            if kind == "delta":
                text.append(payload)
            elif kind == "cancelled":
                return None  # nobody is there to read an answer
            elif kind == "error":
                raise ApiError(500, payload, type="server_error")
            else:
                return completion_body(cid, model, "".join(text), payload["finish_reason"], payload["prompt_tokens"],
                                       payload["completion_tokens"])
    finally:
        watcher.cancel()
        engine.cancel(job)  # a no-op for a finished job


async def _stream(engine, job, listener, cid: str, model: str, include_usage: bool):
    """SSE chunks in OpenAI's format; a client that goes away cancels the job (Starlette cancels this generator)."""
    created = int(time.time())

    def event(body: dict) -> str:
        return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"

    try:
        yield event(chunk_body(cid, model, created, {"role": "assistant", "content": ""}))
        while True:
            kind, payload = await listener.queue.get()
            if kind == "delta":
                yield event(chunk_body(cid, model, created, {"content": payload}))
            elif kind == "error":  # the status line is gone: the error travels as an event, as OpenAI does
                yield event(ApiError(500, payload, type="server_error").body())
                break
            else:
                yield event(chunk_body(cid, model, created, {}, payload["finish_reason"]))
                if include_usage:
                    yield event(chunk_body(cid, model, created, None, usage_counts=usage(
                        payload["prompt_tokens"], payload["completion_tokens"])))
                break
        yield "data: [DONE]\n\n"
    finally:
        engine.cancel(job)  # a no-op for a finished job; stops a running or waiting one


@contextlib.contextmanager
def running_server(app: FastAPI, host: str = "127.0.0.1", port: int = 0, timeout: float = 30.0):
    """Serve `app` with uvicorn in a thread of this process (tests, benchmarks); yields the base URL. The socket is
    bound before uvicorn starts, so port 0 (a free port) has no race; the server always stops on exit."""
    import uvicorn

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=2))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="omni-serve-uvicorn", daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + timeout
        while not server.started:
            if not thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the server did not start")
            time.sleep(0.02)
        yield f"http://{host}:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(timeout)
        sock.close()


# ---------------------------------------------------------------------------------------------- the command line
def add_parser(sub) -> None:
    p = sub.add_parser("serve", help="OpenAI-compatible chat server (streaming, media) with a web chat page",
                       description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("path", metavar="PATH", help="an exported model folder or a training checkpoint")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    p.add_argument("--served-model-name", help="the model id clients send (default: PATH's folder name)")
    p.add_argument("--api-key", help=f"require 'Authorization: Bearer KEY' on /v1 (default: ${API_KEY_ENV}, if set)")
    p.add_argument("--device", default=None, help="cuda, cuda:N or cpu (default cuda if available)")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="weights dtype; auto = bfloat16 on a GPU that supports it, else float32")
    p.add_argument("--tokenizer", metavar="FOLDER", help="tokenizer folder for a checkpoint moved out of its run")
    p.add_argument("--trust-remote-code", action="store_true",
                   help="let the model folder's own .py files (its auto_map) load the processor; off by default: a "
                        "folder is read with this package's classes and none of its code runs")
    p.add_argument("--media-root", metavar="DIR",
                   help="the only folder requests may name local media files in (off by default)")
    p.add_argument("--max-batch-size", type=int, default=8, help="requests generated together (default 8)")
    p.add_argument("--max-queue", type=int, default=64,
                   help="requests waiting for the model before new ones get 503 (default 64)")
    p.add_argument("--max-body-mb", type=float, default=64.0, help="largest request body in MiB (default 64)")
    p.add_argument("--max-media-mb", type=float, default=20.0,
                   help="largest medium in MiB: one base64 medium's bytes, or one file / frame folder under "
                        "--media-root (default 20)")
    p.add_argument("--max-media-per-request", type=int, default=8, help="media parts per request (default 8)")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"],
                   help="server log level (default info; request bodies and the API key are never logged)")
    p.set_defaults(handler=run)


def _check_args(args) -> None:
    for name in ("max_batch_size", "max_queue", "max_media_per_request"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    for name in ("max_body_mb", "max_media_mb"):
        if not getattr(args, name) > 0:
            raise ValueError(f"--{name.replace('_', '-')} must be > 0, got {getattr(args, name)}")
    if not 1 <= args.port <= 65535:
        raise ValueError(f"--port must be in 1..65535, got {args.port}")
    if args.media_root is not None and not Path(args.media_root).is_dir():
        raise ValueError(f"--media-root {args.media_root}: not a folder")
    if args.api_key is not None and not args.api_key.strip():
        raise ValueError("--api-key is empty")


def build_server(args):
    """(engine, app) for parsed `omni serve` arguments; the model loads here."""
    import torch

    from omni.loading import load_model_and_processor

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if args.dtype == "auto":
        use_bf16 = device.startswith("cuda") and torch.cuda.is_bf16_supported()
        dtype = torch.bfloat16 if use_bf16 else torch.float32
    else:
        dtype = getattr(torch, args.dtype)
    model, processor = load_model_and_processor(args.path, dtype=dtype, device=device, tokenizer=args.tokenizer,
                                                trust_remote_code=args.trust_remote_code)
    config = model.generation_config
    api_key = args.api_key if args.api_key is not None else (os.environ.get(API_KEY_ENV) or None)
    settings = ServeSettings(
        model_name=args.served_model_name or Path(args.path).resolve().name,
        context_length=int(model.config.max_position_embeddings),
        limits=InputLimits(max_media_bytes=int(args.max_media_mb * MIB), max_media_items=args.max_media_per_request,
                           media_root=Path(args.media_root).resolve() if args.media_root else None),
        max_body_bytes=int(args.max_body_mb * MIB), api_key=api_key,
        default_do_sample=bool(config.do_sample), default_temperature=float(config.temperature or 1.0),
        default_top_p=float(config.top_p or 1.0))
    engine = GenerationEngine(model, processor, max_batch_size=args.max_batch_size, max_queue=args.max_queue)
    return engine, create_app(engine, settings), settings


def run(args: argparse.Namespace, rest=None) -> int:
    import uvicorn
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    try:
        _check_args(args)
        engine, app, settings = build_server(args)
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        print(f"error: {exc.args[0] if isinstance(exc, KeyError) and exc.args else exc}", file=sys.stderr)
        return 1
    if args.host not in ("127.0.0.1", "localhost", "::1") and not settings.api_key:
        log.warning("binding %s without an API key: anyone who can reach this port can use the model "
                    "(--api-key KEY or $%s)", args.host, API_KEY_ENV)
    key_state = "required (Authorization: Bearer ...)" if settings.api_key else "off"
    log.info("serving %r on http://%s:%d (chat page at /, API at /v1; API key %s; media root %s)",
             settings.model_name, args.host, args.port, key_state, settings.limits.media_root or "off")
    try:
        uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)
    finally:
        engine.close()
    return 0


__all__ = ["API_KEY_ENV", "ServeSettings", "add_parser", "build_server", "create_app", "run", "running_server"]
