"""Servers on free loopback ports, in threads, stopped after each test; the tiny engine loaded once."""

from __future__ import annotations

import json
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from kimivl_cli.backends import ChatOptions
from kimivl_cli.cli.flags import flag
from kimivl_cli.engine.events import AnswerDelta, Done, Event, ThinkingDelta, Usage
from kimivl_cli.serve import ChatServer


@pytest.fixture(scope="session")
def tiny_backend(tiny_checkpoint: Path):
    from kimivl_cli.backends.local import LocalBackend
    from kimivl_cli.tasks.backend import open_engine

    return LocalBackend(open_engine(str(tiny_checkpoint), "cpu"))


@pytest.fixture
def start_server() -> Iterator:
    servers: list[ChatServer] = []

    def start(backend: Any, **kw: Any) -> ChatServer:
        server = ChatServer(
            backend, "127.0.0.1", 0, **{"name_field": flag, **kw}
        )  # messages as `kimivl serve` words them
        threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


class ScriptedBackend:
    """A fake model: thinks, answers `answer` in words (each after `delay` s), or raises `error`."""

    name = "scripted"

    def __init__(self, answer: str = "all is well", thinking: str = "let me see", delay: float = 0.0, error=None):
        self.answer, self.thinking, self.delay, self.error = answer, thinking, delay, error
        self.calls: list[tuple[Sequence, Sequence, ChatOptions]] = []
        self.closed = threading.Event()

    def chat(self, messages, images, options=ChatOptions()) -> Iterator[Event]:
        self.calls.append((messages, images, options))
        if self.error is not None:
            raise self.error
        return self._events()

    def _events(self) -> Iterator[Event]:
        try:
            if self.thinking:
                yield ThinkingDelta(self.thinking)
            for i, word in enumerate(self.answer.split(" ")):
                time.sleep(self.delay)
                yield AnswerDelta(word if i == 0 else " " + word)
            yield Done(usage=Usage(prompt_tokens=5, thinking_tokens=3, answer_tokens=4), model=self.name)
        finally:
            self.closed.set()


def http(
    method: str, url: str, body: Any = None, key: str | None = None, raw: bytes | None = None, timeout: float = 60
) -> tuple[int, dict[str, str], bytes]:
    """One request with urllib: (status, headers, body) whatever the status."""
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    headers = {"Content-Type": "application/json"}
    if key:
        headers["Authorization"] = f"Bearer {key}"
    request = urllib.request.Request(url, data=data, headers=headers, method=method)
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), exc.read()


def sse_events(payload: bytes) -> list[Any]:
    """The `data:` payloads of an SSE body, JSON-decoded except the final `[DONE]`."""
    out: list[Any] = []
    for block in payload.decode().split("\n\n"):
        if block.startswith("data: "):
            data = block[6:]
            out.append(data if data == "[DONE]" else json.loads(data))
    return out
