"""Servers for client tests: a scripted OpenAI-compatible one (stdlib; each request gets the next
step), `kimivl serve` over the tiny checkpoint, and the CLI run in-process."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest


def sse_chunks(*deltas: dict[str, Any], usage: dict[str, Any] | None = None, finish: str = "stop") -> list[dict]:
    """Chat-completion chunks for these deltas, then the finish chunk and a usage chunk."""
    base = {"id": "c1", "object": "chat.completion.chunk", "created": 0, "model": "fake-model"}
    chunks = [{**base, "choices": [{"index": 0, "delta": d, "finish_reason": None}]} for d in deltas]
    chunks.append({**base, "choices": [{"index": 0, "delta": {}, "finish_reason": finish}]})
    chunks.append({**base, "choices": [], "usage": usage or {"prompt_tokens": 3, "completion_tokens": 2}})
    return chunks


@dataclass
class Step:
    """What the server does with one request: a status with an error body, a dropped connection,
    an SSE reply (optionally cut after `cut_after` chunks), or a silent wait of `delay` seconds."""

    status: int = 200
    chunks: list[dict] = field(default_factory=lambda: sse_chunks({"content": "ok"}))
    drop: bool = False
    cut_after: int | None = None
    delay: float = 0.0
    headers: dict[str, str] = field(default_factory=dict)


class _QuietServer(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # clients that time out or hang up on purpose break the pipe: expected here


class FakeServer:
    """Each POST takes the next of `steps`, each GET /models the next of `model_steps` (default:
    answer); the last step repeats."""

    def __init__(self, steps: list[Step], model_steps: list[Step] | None = None) -> None:
        self.steps = list(steps)
        self.model_steps = list(model_steps or [Step()])
        self.requests: list[dict[str, Any]] = []  # {"method", "path", "headers", "body"}
        self._lock = threading.Lock()
        self.httpd = _QuietServer(("127.0.0.1", 0), type("Handler", (_Handler,), {"owner": self}))
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"

    def _record(self, handler: BaseHTTPRequestHandler, body: Any) -> Step:
        with self._lock:
            self.requests.append(
                {"method": handler.command, "path": handler.path, "headers": dict(handler.headers), "body": body}
            )
            steps = self.steps if body is not None else self.model_steps
            return steps.pop(0) if len(steps) > 1 else steps[0]

    @property
    def posts(self) -> list[dict[str, Any]]:
        return [r for r in self.requests if r["method"] == "POST"]


class _Handler(BaseHTTPRequestHandler):
    """Serves the script of a `FakeServer` (`owner`, set on a subclass per server)."""

    owner: FakeServer
    protocol_version = "HTTP/1.1"

    def log_message(self, *args: Any) -> None:
        pass

    def do_GET(self) -> None:
        if self._failed(self.owner._record(self, None)):
            return
        payload = json.dumps({"object": "list", "data": [{"id": "fake-model", "object": "model"}]}).encode()
        self._reply(200, payload, "application/json")

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        step = self.owner._record(self, body)
        if self._failed(step):
            return
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Connection", "close")
        self.end_headers()
        self.close_connection = True
        for i, chunk in enumerate(step.chunks):
            if step.cut_after is not None and i == step.cut_after:
                self.wfile.write(b'data: {"choi')  # half an event, then the connection goes
                return
            self.wfile.write(b"data: " + json.dumps(chunk).encode() + b"\n\n")
            self.wfile.flush()
        self.wfile.write(b"data: [DONE]\n\n")

    def _failed(self, step: Step) -> bool:
        """Wait `step.delay`, then drop the connection or send the error status, if the step says so."""
        time.sleep(step.delay)
        if step.drop:
            self.close_connection = True
            return True  # no response at all: the client sees the connection close
        if step.status != 200:
            error = {"error": {"message": f"scripted {step.status}", "type": "x"}}
            self._reply(step.status, json.dumps(error).encode(), "application/json", step.headers)
            return True
        return False

    def _reply(self, status: int, payload: bytes, kind: str, headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(payload)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(payload)


@pytest.fixture
def fake_server() -> Iterator:
    """`fake_server(steps)` starts a scripted server on a free loopback port; all stop after the test."""
    servers: list[FakeServer] = []

    def start(steps: list[Step], model_steps: list[Step] | None = None) -> FakeServer:
        server = FakeServer(steps, model_steps)
        threading.Thread(target=server.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.httpd.shutdown()
        server.httpd.server_close()


API_KEY = "test-key"


@pytest.fixture(scope="session")
def kimivl_server(tiny_checkpoint):
    """`kimivl serve` in this process over the tiny checkpoint (key `API_KEY`), shared by the session.
    Its queue holds 16 requests, so concurrency 4 never sees a 503."""
    from kimivl_cli.backends.local import LocalBackend
    from kimivl_cli.serve import ChatServer
    from kimivl_cli.tasks.backend import open_engine

    server = ChatServer(LocalBackend(open_engine(str(tiny_checkpoint), "cpu")), "127.0.0.1", 0, api_key=API_KEY)
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    yield server
    server.shutdown()
    server.server_close()
