"""`omni serve` throughput: generated tokens/s with 1, 4 and 16 concurrent clients against the same requests sent
one by one.

    OMP_NUM_THREADS=2 python -m omni.benchmarks.serve                     # a tiny random model (omni.demo's config)
    OMP_NUM_THREADS=2 python -m omni.benchmarks.serve runs/tiny_omni/export --requests 32 --max-tokens 32
    omni bench serve --clients 1,4,16 --max-batch-size 16 --rounds 2

Starts the server in this process (the same `build_server` as `omni serve`, uvicorn in a thread on a free loopback
port) and sends the same list of greedy chat requests (text, every fourth with an image) through HTTP with N client
threads at a time. "one by one" sends them sequentially (N = 1); the other rows keep N requests in flight. Rounds
interleave the rows, so a busy spell on a shared machine hits all alike; the median round is reported. Every answer
is checked equal to its one-by-one answer (batching must not change greedy results). The client threads share this
process's cores with the model: on a 2-core machine the numbers are a lower bound.
"""

from __future__ import annotations

import argparse
import io
import os
import statistics
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

PROMPTS = ["What is 2 plus 3?", "Describe the image.", "Repeat: a b c", "Which way does the square move?",
           "How many beeps?", "Transcribe the digits.", "What colour is the shape?", "Count to five."]


def tiny_model_folder(path: Path) -> Path:
    """omni.demo's tiny config with random weights, saved as an exported folder."""
    from omni_moe.data.tokenizer import build_bpe_tokenizer
    from omni_moe.modeling.modeling_omni import OmniMoeForCausalLM
    from omni_moe.modeling.processing_omni import OmniMoeProcessor
    from omni.demo import SENTENCES, tiny_omni_config

    tokenizer = build_bpe_tokenizer(SENTENCES, vocab_size=320)
    config = tiny_omni_config(tokenizer)
    torch.manual_seed(0)
    OmniMoeForCausalLM(config).save_pretrained(str(path))
    tokenizer.save_pretrained(str(path))
    OmniMoeProcessor.from_config(config, tokenizer).save_pretrained(str(path))
    return path


def requests_for(count: int, max_tokens: int) -> list[dict]:
    import base64

    from PIL import Image

    rng = np.random.default_rng(0)
    out = []
    for i in range(count):
        text = PROMPTS[i % len(PROMPTS)] + f" ({i})"
        content: list[dict] = [{"type": "text", "text": text}]
        if i % 4 == 1:
            buffer = io.BytesIO()
            Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(buffer, format="PNG")
            url = "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()
            content.insert(0, {"type": "image_url", "image_url": {"url": url}})
        out.append({"messages": [{"role": "user", "content": content}], "max_tokens": max_tokens, "temperature": 0})
    return out


def run_round(url: str, model: str, bodies: list[dict], clients: int) -> tuple[float, int, list[str]]:
    """(seconds, generated tokens, answers) for all requests with `clients` in flight."""
    import httpx2 as httpx

    with httpx.Client(base_url=url, timeout=600) as http:
        def ask(body):
            response = http.post("/v1/chat/completions", json={"model": model, **body})
            response.raise_for_status()
            reply = response.json()
            return reply["usage"]["completion_tokens"], reply["choices"][0]["message"]["content"]

        start = time.perf_counter()
        if clients == 1:
            results = [ask(body) for body in bodies]
        else:
            with ThreadPoolExecutor(clients) as pool:
                results = list(pool.map(ask, bodies))
        seconds = time.perf_counter() - start
    return seconds, sum(tokens for tokens, _ in results), [text for _, text in results]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("path", nargs="?", help="a model folder or checkpoint (default: a tiny random model)")
    parser.add_argument("--requests", type=int, default=32, help="requests per row (default 32)")
    parser.add_argument("--max-tokens", type=int, default=32, help="max_tokens of every request (default 32)")
    parser.add_argument("--clients", default="4,16", help="concurrent client counts besides one by one")
    parser.add_argument("--max-batch-size", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)
    from omni.cli import build_parser
    from omni.serve import build_server, running_server

    counts = [1, *(int(c) for c in args.clients.split(",") if int(c) != 1)]
    with tempfile.TemporaryDirectory(prefix="omni-bench-serve-") as tmp:
        path = args.path or str(tiny_model_folder(Path(tmp) / "tiny-omni"))
        serve_args = build_parser().parse_args(["serve", path, "--max-batch-size", str(args.max_batch_size),
                                                "--max-queue", str(max(64, args.requests))])
        engine, app, settings = build_server(serve_args)
        bodies = requests_for(args.requests, args.max_tokens)
        try:
            with running_server(app) as url:
                run_round(url, settings.model_name, bodies[:4], 4)  # warm-up
                times: dict[int, list[float]] = {c: [] for c in counts}
                tokens, answers = {}, {}
                for _ in range(args.rounds):
                    for clients in counts:
                        seconds, tokens[clients], answers[clients] = run_round(url, settings.model_name, bodies,
                                                                               clients)
                        times[clients].append(seconds)
                largest = engine.stats()["largest_batch"]
        finally:
            engine.close()
    baseline = tokens[1] / statistics.median(times[1])
    print(f"omni serve, {args.requests} greedy requests of max_tokens={args.max_tokens} (every 4th with an image), "
          f"--max-batch-size {args.max_batch_size}, torch threads {torch.get_num_threads()}, "
          f"median of {args.rounds} rounds; load avg {', '.join(f'{x:.1f}' for x in os.getloadavg())}")
    print("| clients in flight | generated tokens | seconds | tokens/s | vs one by one | answers = one by one |")
    print("|---|---|---|---|---|---|")
    for clients in counts:
        seconds = statistics.median(times[clients])
        rate = tokens[clients] / seconds
        name = "1 (one by one)" if clients == 1 else str(clients)
        same = "yes" if answers[clients] == answers[1] else "NO"
        print(f"| {name} | {tokens[clients]} | {seconds:.2f} | {rate:.0f} | {rate / baseline:.2f}x | {same} |")
    print(f"largest batch the worker formed: {largest}")
    return 0 if all(answers[c] == answers[1] for c in counts) else 1


if __name__ == "__main__":
    raise SystemExit(main())
