"""The generation worker behind `omni serve`: one thread owns the model and answers queued requests in batches.

    engine = GenerationEngine(model, processor, max_batch_size=8, max_queue=64)
    job = engine.submit(Job(prompt, max_tokens=32, ...), on_event)   # raises QueueFull when the queue is full
    engine.cancel(job)                                                # a client went away: its row stops

Batching: the worker takes the oldest waiting job plus up to `max_batch_size - 1` more that decode the same way
(greedy jobs together; sampled jobs with equal temperature / top_p; a seeded job alone, so its seed alone decides
its answer), renders them into one left-padded batch with the processor and runs one `model.generate`. A per-step
stopping criterion (`_BatchProgress`) gives every row its own end: its end-of-turn token, its stop strings, its
`max_tokens` or its cancellation, and streams each row's new text as it is decoded. Jobs that arrive while a batch
runs wait for the next batch (static batching, not continuous). Greedy rows in a batch equal the same prompts run
alone (left padding + per-row positions: tests/unit/test_generate_media.py, tests/e2e/test_serve.py).
"""

from __future__ import annotations

import collections
import copy
import logging
import threading
from dataclasses import dataclass, field
from typing import Callable

import torch

from omni.serve_inputs import Prompt, count_prompt_tokens

log = logging.getLogger("omni.serve")
MEDIA_KINDS = ("image", "video", "audio")


class QueueFull(Exception):
    pass


@dataclass
class Job:
    prompt: Prompt
    prompt_tokens: int
    max_tokens: int
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    cancelled: threading.Event = field(default_factory=threading.Event)

    def batch_key(self):
        """Jobs with equal keys may share a batch; None = alone."""
        if not self.do_sample:
            return ("greedy",)
        return None if self.seed is not None else ("sample", self.temperature, self.top_p)


# on_event(kind, payload): ("delta", text) while decoding, then exactly one of ("done", {"finish_reason",
# "prompt_tokens", "completion_tokens"}) or ("error", message). Called from the worker thread.
EventSink = Callable[[str, object], None]


class _Row:
    """One job's decoding state inside a running batch."""

    def __init__(self, job: Job, sink: EventSink, tokenizer, stop_ids: set[int]):
        self.job, self.sink, self.tokenizer, self.stop_ids = job, sink, tokenizer, stop_ids
        self.tokens: list[int] = []
        self.emitted = ""
        self.done = False
        self.hold = max((len(s) for s in job.stop), default=1) - 1  # chars that might begin a stop string

    def step(self, token: int) -> None:
        if self.done:
            return
        if self.job.cancelled.is_set():
            self.done = True  # nobody listens any more: no events
            return
        self.tokens.append(token)
        if token in self.stop_ids:
            self._finish("stop", self._text(self.tokens[:-1]))
            return
        text = self._text(self.tokens)
        cut = min((i for i in (text.find(s) for s in self.job.stop) if i >= 0), default=-1)
        if cut >= 0:
            self._finish("stop", text[:cut])
        elif len(self.tokens) >= self.job.max_tokens:
            self._finish("length", text)
        else:
            # a trailing U+FFFD is an incomplete UTF-8 character (byte-level BPE): wait for the rest of it
            safe = len(text.rstrip("\ufffd")) - self.hold
            if safe > len(self.emitted) and text.startswith(self.emitted):
                self.sink("delta", text[len(self.emitted):safe])
                self.emitted = text[:safe]

    def _text(self, tokens: list[int]) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=True)

    def _finish(self, reason: str, text: str) -> None:
        self.done = True
        if text.startswith(self.emitted) and len(text) > len(self.emitted):
            self.sink("delta", text[len(self.emitted):])
        self.sink("done", {"finish_reason": reason, "prompt_tokens": self.job.prompt_tokens,
                           "completion_tokens": len(self.tokens)})

    def fail(self, message: str) -> None:
        if not self.done:
            self.done = True
            self.sink("error", message)


class _BatchProgress:
    """A transformers stopping criterion: feeds each row its new token and tells generate which rows are done."""

    def __init__(self, rows: list[_Row], prompt_length: int):
        self.rows, self.prompt_length = rows, prompt_length

    def __call__(self, input_ids, scores, **kwargs):
        if input_ids.shape[1] > self.prompt_length:
            newest = input_ids[:, -1].tolist()
            for row, token in zip(self.rows, newest):
                row.step(token)
        return torch.tensor([row.done or row.job.cancelled.is_set() for row in self.rows], dtype=torch.bool,
                            device=input_ids.device)


class GenerationEngine:
    def __init__(self, model, processor, *, max_batch_size: int = 8, max_queue: int = 64):
        if max_batch_size < 1 or max_queue < 1:
            raise ValueError("max_batch_size and max_queue must be >= 1")
        self.model, self.processor = model, processor
        self.max_batch_size, self.max_queue = max_batch_size, max_queue
        self.tokenizer = processor.tokenizer
        eos = model.generation_config.eos_token_id
        self.stop_ids = {i for i in [self.tokenizer.eos_token_id, *(eos if isinstance(eos, list) else [eos])]
                         if i is not None}
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else min(self.stop_ids)
        # a media placeholder is an input slot, never text (as in `omni chat`): never generated
        self.suppress = sorted(i for i in (getattr(model.config, f"{k}_token_id", None) for k in MEDIA_KINDS)
                               if i is not None)
        self.device = model.get_input_embeddings().weight.device
        self._waiting: collections.deque[tuple[Job, EventSink]] = collections.deque()
        self._running = 0
        self._largest_batch = 0
        self._generated_tokens = 0  # over all requests, cancelled ones included
        self._cond = threading.Condition()
        # the request threads count prompt tokens while the worker processes a batch: one processor call at a time
        # (a fast tokenizer's settings are shared state)
        self._processor_lock = threading.Lock()
        self._closed = False
        self._thread = threading.Thread(target=self._loop, name="omni-serve-generate", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ the HTTP side
    def submit(self, job: Job, sink: EventSink) -> Job:
        with self._cond:
            if self._closed:
                raise QueueFull("the server is shutting down")
            if len(self._waiting) >= self.max_queue:
                raise QueueFull(f"{len(self._waiting)} requests are waiting (--max-queue {self.max_queue})")
            self._waiting.append((job, sink))
            self._cond.notify()
        return job

    def queue_full(self) -> bool:
        with self._cond:
            return self._closed or len(self._waiting) >= self.max_queue

    def prompt_tokens(self, prompt: Prompt) -> int:
        """The prompt's token count (media placeholders included); ApiError(400) when the processor refuses it."""
        with self._processor_lock:
            return count_prompt_tokens(prompt, self.processor)

    def cancel(self, job: Job) -> None:
        """Stop a job: a waiting one leaves the queue now, a running one stops at its batch's next step."""
        job.cancelled.set()
        with self._cond:
            for entry in list(self._waiting):
                if entry[0] is job:
                    self._waiting.remove(entry)

    def stats(self) -> dict:
        with self._cond:
            return {"waiting": len(self._waiting), "running": self._running, "max_queue": self.max_queue,
                    "max_batch_size": self.max_batch_size, "largest_batch": self._largest_batch,
                    "generated_tokens": self._generated_tokens}

    def close(self, timeout: float = 30.0) -> None:
        with self._cond:
            self._closed = True
            for job, sink in self._waiting:
                job.cancelled.set()
                sink("error", "the server is shutting down")
            self._waiting.clear()
            self._cond.notify_all()
        self._thread.join(timeout)

    # ------------------------------------------------------------------ the worker
    def _next_batch(self) -> list[tuple[Job, EventSink]]:
        with self._cond:
            while not self._waiting and not self._closed:
                self._cond.wait()
            if self._closed:
                return []
            first = self._waiting.popleft()
            batch, key = [first], first[0].batch_key()
            if key is not None:
                for entry in list(self._waiting):
                    if len(batch) >= self.max_batch_size:
                        break
                    if entry[0].batch_key() == key:
                        self._waiting.remove(entry)
                        batch.append(entry)
            self._running = len(batch)
            self._largest_batch = max(self._largest_batch, len(batch))
            return batch

    def _loop(self) -> None:
        while True:
            batch = self._next_batch()
            if not batch:
                return
            rows = [_Row(job, sink, self.tokenizer, self.stop_ids) for job, sink in batch]
            try:
                self._generate(rows)
            except Exception:  # noqa: BLE001 - one failed batch must not end the server
                log.exception("generation failed for a batch of %d request(s)", len(rows))
                for row in rows:
                    row.fail("generation failed on the server (see its log)")
            finally:
                with self._cond:
                    self._running = 0
                    self._generated_tokens += sum(len(row.tokens) for row in rows)

    def _generate(self, rows: list[_Row]) -> None:
        jobs = [row.job for row in rows]
        merged = Prompt(conversation=[])
        for job in jobs:
            merged.images += job.prompt.images
            merged.videos += job.prompt.videos
            merged.audios += job.prompt.audios
            merged.video_fps += job.prompt.video_fps
        with self._processor_lock:
            inputs = self.processor([job.prompt.conversation for job in jobs],
                                    **merged.processor_kwargs(self.processor.video_fps), add_generation_prompt=True,
                                    return_labels=False, padding_side="left")
        inputs = inputs.to(self.device)
        first = jobs[0]
        config = copy.deepcopy(self.model.generation_config)
        sampling = dict(temperature=first.temperature, top_p=first.top_p, top_k=0) if first.do_sample else \
            dict(temperature=1.0, top_p=1.0, top_k=50)  # greedy: neutral values, nothing for transformers to warn
        config.update(do_sample=first.do_sample, max_new_tokens=max(job.max_tokens for job in jobs), num_beams=1,
                      eos_token_id=sorted(self.stop_ids), pad_token_id=self.pad_id,
                      suppress_tokens=sorted(set(config.suppress_tokens or []) | set(self.suppress)) or None,
                      **sampling)
        if first.seed is not None:
            torch.manual_seed(first.seed)  # a seeded job runs alone (batch_key), so this RNG is its own
        from transformers import StoppingCriteriaList

        progress = _BatchProgress(rows, inputs["input_ids"].shape[1])
        with torch.inference_mode():
            self.model.generate(**inputs, generation_config=config,
                                stopping_criteria=StoppingCriteriaList([progress]))
        for row in rows:  # generate ended (every row done, or the longest max_tokens reached)
            if not row.done and not row.job.cancelled.is_set():
                row.fail("generation ended before this request finished")


__all__ = ["EventSink", "GenerationEngine", "Job", "QueueFull"]
