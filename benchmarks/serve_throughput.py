"""Throughput of OCR-like requests: the local engine in-process vs `kimivl serve` through the openai backend.

Starts `kimivl serve` as a subprocess on a generated checkpoint (random weights, CPU), then sends
the same pages (a rendered text page, the OCR prompt, greedy, `--max-tokens` new tokens) three
ways in one run: the local backend in this process (concurrency 1: one engine runs one request
at a time), and the openai backend against the server at concurrency 1 and 4. Reports
requests/s, completion tokens/s and mean latency per request.

On a tiny CPU model the figures show what the HTTP path costs (PNG + base64 encoding, JSON, SSE,
the server's queue) next to the model's own time, not what a GPU server does: on vLLM or SGLang
concurrency batches requests on the accelerator, which `kimivl serve` (one request at a time)
does not.

    flock /tmp/bench.lock .venv/bin/python benchmarks/serve_throughput.py [--json] [--pages N] [--size tiny|small]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from PIL import Image, ImageDraw

from kimivl_cli.backends import AnswerOnly, ChatBackend, ChatOptions
from kimivl_cli.backends.local import LocalBackend
from kimivl_cli.backends.openai import OpenAIBackend
from kimivl_cli.tasks.backend import open_engine
from kimivl_cli.tasks.ocr.prompts import ocr_messages
from kimivl_cli.tasks.pool import ordered_map
from kimivl_cli.testing.checkpoint import cached_checkpoint

THREADS = 2  # torch threads, in this process and in the server alike


@dataclass
class Row:
    path: str
    concurrency: int
    requests: int
    seconds: float
    requests_per_s: float
    completion_tokens_per_s: float
    mean_latency_s: float


def page_image(i: int) -> Image.Image:
    """A 336x336 page of text lines (a few hundred image tokens), different per request."""
    image = Image.new("RGB", (336, 336), "white")
    draw = ImageDraw.Draw(image)
    for line in range(12):
        draw.text((12, 12 + 26 * line), f"Page {i}, line {line}: the quick brown fox {i * line}", fill="black")
    return image


def measure(path: str, backend: ChatBackend, concurrency: int, pages: int, max_tokens: int) -> Row:
    answer = AnswerOnly(backend, ChatOptions(max_tokens=max_tokens, temperature=0.0), limit=concurrency)
    messages = ocr_messages(None)
    answer(messages, [page_image(-1)])  # warm-up: first-call costs (model name, caches) out of the figure
    latencies: list[float] = []

    def one(i: int) -> int:
        start = time.perf_counter()
        reply = answer(messages, [page_image(i)])
        latencies.append(time.perf_counter() - start)
        return reply.completion_tokens

    start = time.perf_counter()
    tokens = sum(ordered_map(one, range(pages), concurrency))
    seconds = time.perf_counter() - start
    return Row(
        path,
        concurrency,
        pages,
        round(seconds, 3),
        round(pages / seconds, 3),
        round(tokens / seconds, 2),
        round(sum(latencies) / len(latencies), 3),
    )


def start_server(checkpoint: Path) -> tuple[subprocess.Popen, str]:
    env = {**os.environ, "OMP_NUM_THREADS": str(THREADS)}
    command = [sys.executable, "-m", "kimivl_cli", "serve", "--model", str(checkpoint), "--device", "cpu"]
    server = subprocess.Popen([*command, "--port", "0", "--quiet"], env=env, stderr=subprocess.PIPE, text=True)
    line = server.stderr.readline()
    found = re.search(r"at (http://\S+)", line)
    if not found:
        server.kill()
        raise SystemExit(f"kimivl serve did not start: {line}{server.stderr.read()}")
    return server, found[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--pages", type=int, default=16, help="requests per measurement")
    parser.add_argument("--max-tokens", type=int, default=16, help="new tokens per request")
    parser.add_argument("--size", default="tiny", choices=["tiny", "small"], help="generated checkpoint")
    args = parser.parse_args()

    import torch

    torch.set_num_threads(THREADS)
    checkpoint = cached_checkpoint(args.size, seed=0)
    rows = [
        measure("local in-process", LocalBackend(open_engine(str(checkpoint), "cpu")), 1, args.pages, args.max_tokens)
    ]
    server, url = start_server(checkpoint)
    try:
        remote = OpenAIBackend(url)
        rows += [measure("openai -> kimivl serve", remote, c, args.pages, args.max_tokens) for c in (1, 4)]
    finally:
        server.terminate()
        server.wait(timeout=30)
    setup = {"checkpoint": f"generated {args.size} (random weights)", "device": "cpu", "torch_threads": THREADS}
    setup |= {"cpus": os.cpu_count(), "max_tokens": args.max_tokens, "image": "336x336 text page"}
    if args.json:
        print(json.dumps({"setup": setup, "rows": [asdict(r) for r in rows]}, indent=2))
        return
    print(", ".join(f"{k}: {v}" for k, v in setup.items()))
    print(f"{'path':<24} {'conc':>4} {'req':>4} {'s':>7} {'req/s':>7} {'tok/s':>8} {'latency s':>9}")
    for r in rows:
        print(
            f"{r.path:<24} {r.concurrency:>4} {r.requests:>4} {r.seconds:>7.2f} {r.requests_per_s:>7.2f} "
            f"{r.completion_tokens_per_s:>8.1f} {r.mean_latency_s:>9.3f}"
        )


if __name__ == "__main__":
    main()
