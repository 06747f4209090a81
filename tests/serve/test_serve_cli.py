"""The real `kimivl serve` command in a subprocess: starts, answers, stops cleanly on SIGTERM (as on Ctrl-C)."""

from __future__ import annotations

import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from kimivl_cli.backends import ChatOptions, collect
from kimivl_cli.backends.openai import OpenAIBackend
from kimivl_cli.errors import RuntimeFailure


def test_serve_command_end_to_end(tiny_checkpoint: Path) -> None:
    env = {**os.environ, "KIMIVL_API_KEY": "sk-env"}
    args = [sys.executable, "-m", "kimivl_cli", "serve", "--model", str(tiny_checkpoint), "--device", "cpu"]
    proc = subprocess.Popen(
        [*args, "--port", "0", "--queue-size", "2", "--served-model-name", "kimi-tiny"],
        stderr=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        text=True,
        env=env,
    )
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in proc.stderr], daemon=True).start()
    try:
        url = _wait_for_url(lines, proc, timeout=60)
        assert url.startswith("http://127.0.0.1:")  # loopback by default
        with_key = OpenAIBackend(url, api_key="sk-env", timeout=30, max_retries=0)
        assert with_key.name == "kimi-tiny"
        messages = [{"role": "user", "content": "Hello"}]
        completion = collect(with_key.chat(messages, [], ChatOptions(max_tokens=3)))
        assert 1 <= completion.done.usage.completion_tokens <= 3
        try:
            collect(OpenAIBackend(url, model="kimi-tiny", max_retries=0).chat(messages, []))
            raise AssertionError("a request without the key was served")
        except RuntimeFailure as exc:
            assert "API key" in exc.message
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=15) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    rest = "".join(iter_queue(lines))
    assert "Traceback" not in rest


def _wait_for_url(lines: queue.Queue[str], proc: subprocess.Popen, timeout: float) -> str:
    deadline = time.monotonic() + timeout
    seen = []
    while time.monotonic() < deadline:
        try:
            line = lines.get(timeout=0.5)
        except queue.Empty:
            assert proc.poll() is None, f"serve exited early: {''.join(seen)}"
            continue
        seen.append(line)
        if match := re.search(r"at (http://\S+/v1)", line):
            return match.group(1)
    raise AssertionError(f"serve did not start in {timeout} s: {''.join(seen)}")


def iter_queue(lines: queue.Queue[str]):
    while True:
        try:
            yield lines.get(timeout=0.5)
        except queue.Empty:
            return
