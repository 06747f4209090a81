"""Hostile clients of `kimivl serve`: bombs in data URLs, bodies past every limit, numbers past
every range, clients that leave or never speak, and a server started carelessly."""

from __future__ import annotations

import base64
import io
import json
import re
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from PIL import Image

from kimivl_cli.errors import InputError
from kimivl_cli.serve import ChatServer
from kimivl_cli.serve import server as server_module
from tests.hostile.conftest import nested_json, refused
from tests.serve.conftest import ScriptedBackend, http


@pytest.fixture(scope="module")
def tiny_backend(tiny_checkpoint: Path):
    from kimivl_cli.backends.local import LocalBackend
    from kimivl_cli.tasks.backend import open_engine

    return LocalBackend(open_engine(str(tiny_checkpoint), "cpu", "none"))


def _tiff_uri(pages: int, side: int) -> str:
    images = [Image.new("1", (side, side), 0) for _ in range(pages)]
    buffer = io.BytesIO()
    images[0].save(buffer, "TIFF", save_all=True, append_images=images[1:], compression="group4")
    return "data:image/tiff;base64," + base64.b64encode(buffer.getvalue()).decode()


def _body(url: str | None = None, **extra) -> dict:
    parts: list[dict] = [{"type": "text", "text": "Describe."}]
    if url:
        parts.insert(0, {"type": "image_url", "image_url": {"url": url}})
    return {"messages": [{"role": "user", "content": parts}], **extra}


def _wait(condition, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.01)


# --- 2. the queue before any decoding; one page per image part ------------------------------------


def test_a_full_server_refuses_before_decoding(start_server, monkeypatch) -> None:
    from kimivl_cli.media import images

    decoded: list[object] = []
    real = images.load_images
    monkeypatch.setattr(images, "load_images", lambda *a, **k: decoded.append(a) or real(*a, **k))
    backend = ScriptedBackend(answer="a b c d e f", delay=0.2)
    server = start_server(backend, queue_size=0)
    url = server.url + "/chat/completions"
    bomb = _body(_tiff_uri(20, 4000))
    with ThreadPoolExecutor(1) as pool:
        running = pool.submit(http, "POST", url, _body())
        _wait(lambda: server.worker.running)
        started = time.perf_counter()
        status, _, payload = http("POST", url, bomb)
        assert status == 503 and json.loads(payload)["error"]["code"] == "queue_full"
        assert time.perf_counter() - started < 1.0 and not decoded  # the bomb was never opened
        assert running.result()[0] == 200


def test_a_multi_page_tiff_part_decodes_its_first_page_only(start_server, monkeypatch) -> None:
    """20 pages of 4000 x 4000 (320 MP, over the per-input budget) as one image part: the part is one
    image, so only the first page's header and pixels are read, and the request is served."""
    from kimivl_cli.media import images

    decoded: list[tuple[int, int]] = []
    real = images._to_rgb
    monkeypatch.setattr(images, "_to_rgb", lambda image, bg: decoded.append(image.size) or real(image, bg))
    backend = ScriptedBackend()
    server = start_server(backend)
    status, _, payload = http("POST", server.url + "/chat/completions", _body(_tiff_uri(20, 4000)))
    assert status == 200, payload
    assert [image.size for image in backend.calls[0][1]] == [(4000, 4000)] == decoded  # one page decoded


# --- 10. bodies and numbers past every limit: 400 / 413, never 500 or a broken pipe ----------------


@pytest.mark.parametrize(
    ("raw", "needle"),
    [
        (nested_json(100_000).encode(), "nested too deeply"),
        (b'{"messages": [{"role": "user", "content": "hi"}], "max_tokens": 1e400}', "'max_tokens' must be an integer"),
        (b'{"messages": [{"role": "user", "content": "hi"}], "temperature": -1e999}', "finite number"),
        (b'{"messages": [{"role": "user", "content": "hi"}], "top_p": NaN}', "top_p"),
        (b'{"messages": [{"role": "user", "content": "hi"}], "seed": ' + str(2**70).encode() + b"}", "seed"),
        (b'{"messages": [{"role": "user", "content": "hi"}], "max_tokens": ' + b"9" * 5000 + b"}", "not valid JSON"),
        (b'{"messages": [{"role": "user", "content": "hi"}], "max_tokens": 0}', "max_new_tokens"),
    ],
)
def test_numbers_and_nesting_past_every_range_are_400(start_server, tiny_backend, raw: bytes, needle: str) -> None:
    server = start_server(tiny_backend)
    status, headers, payload = http("POST", server.url + "/chat/completions", raw=raw)
    assert status == 400 and headers["Content-Type"] == "application/json", payload[:300]
    message = json.loads(payload)["error"]["message"]
    assert needle in message and len(message) < 400 and "Traceback" not in message


def test_a_100_mb_body_gets_413_not_a_broken_pipe(start_server) -> None:
    server = start_server(ScriptedBackend())
    body = b'{"messages": "' + b"x" * (100 << 20) + b'"}'
    status, _, payload = http("POST", server.url + "/chat/completions", raw=body)
    assert status == 413 and json.loads(payload)["error"]["code"] == "body_too_large"
    assert http("GET", server.url.removesuffix("/v1") + "/health")[0] == 200


# --- 3. a client that leaves cancels its request, streamed or not -----------------------------------


def _send_and_leave(server: ChatServer, body: dict) -> None:
    host, port = server.server_address[:2]
    raw = json.dumps(body).encode()
    with socket.create_connection((host, port), timeout=5) as sock:
        sock.sendall(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            + f"Content-Length: {len(raw)}\r\n\r\n".encode()
            + raw
        )
        time.sleep(0.3)  # the request is running


def test_a_non_streamed_request_stops_when_its_client_leaves(start_server) -> None:
    backend = ScriptedBackend(answer=" ".join(["word"] * 400), delay=0.02)  # 8 s if nobody stops it
    server = start_server(backend)
    started = time.perf_counter()
    _send_and_leave(server, _body(stream=False))
    assert backend.closed.wait(3), "the generation kept the worker after the client left"
    assert time.perf_counter() - started < 3
    _wait(lambda: not server.worker.running)


def test_a_queued_request_whose_client_left_never_runs(start_server) -> None:
    backend = ScriptedBackend(answer="a b c d e", delay=0.1)
    server = start_server(backend, queue_size=2)
    with ThreadPoolExecutor(1) as pool:
        running = pool.submit(http, "POST", server.url + "/chat/completions", _body())
        _wait(lambda: server.worker.running)
        _send_and_leave(server, _body(stream=False))
        assert running.result()[0] == 200
    _wait(lambda: not server.worker.running and server.worker.waiting == 0)
    assert len(backend.calls) == 1  # the one whose client left was skipped


# --- 4. keys, idle sockets, threads ---------------------------------------------------------------------


def test_an_empty_api_key_is_refused(kimivl, tiny_checkpoint: Path) -> None:
    with pytest.raises(InputError, match="API key is empty"):
        ChatServer(ScriptedBackend(), "127.0.0.1", 0, api_key="")
    refused(kimivl("serve", "--model", tiny_checkpoint, "--port", "0", "--api-key", ""), "API key is empty")
    refused(kimivl("serve", "--model", tiny_checkpoint, "--port", "0", "--api-key", "   "), "API key is empty")


def test_idle_connections_are_closed_and_threads_bounded(start_server, monkeypatch) -> None:
    monkeypatch.setattr(server_module._Handler, "timeout", 0.5)
    monkeypatch.setattr(server_module, "MIN_CONNECTIONS", 4)
    before = threading.active_count()
    server = start_server(ScriptedBackend(), queue_size=0)  # 4 connection threads at most
    host, port = server.server_address[:2]
    idle = [socket.create_connection((host, port), timeout=5) for _ in range(10)]
    time.sleep(0.3)
    assert threading.active_count() <= before + 2 + 4  # serve loop + worker + 4 connections
    refusals = 0
    for sock in idle[4:]:
        sock.settimeout(2)
        refusals += sock.recv(1024).startswith(b"HTTP/1.1 503")
    assert refusals >= 5  # beyond the limit: answered at once, no thread
    for sock in idle[:4]:  # the idle ones are closed by the server after the timeout
        sock.settimeout(5)
        assert sock.recv(1024) == b""
    for sock in idle:
        sock.close()
    _wait(lambda: threading.active_count() <= before + 2)
    assert http("GET", server.url.removesuffix("/v1") + "/health")[0] == 200


def test_a_busy_port_or_bad_host_fails_before_the_model_loads(kimivl, tmp_path: Path) -> None:
    missing = tmp_path / "no-model"  # never reached: binding comes first
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        refused(kimivl("serve", "--model", missing, "--port", port), f"cannot listen on 127.0.0.1:{port}", "--port")
    refused(kimivl("serve", "--model", missing, "--host", "999.1.1.1"), "cannot listen", "--host")
    refused(kimivl("serve", "--model", missing, "--host", "bad host name!"), "cannot listen")


def test_startup_says_whether_authentication_is_on(kimivl, tiny_checkpoint: Path, monkeypatch) -> None:
    monkeypatch.setattr(ChatServer, "serve_forever", lambda self, poll_interval=0.5: None)  # start, then stop
    base = ("serve", "--model", tiny_checkpoint, "--port", "0", "--device", "cpu")
    for extra, said in (
        (("--api-key", "sk-1"), "API key required"),
        ((), "no API key: anyone on this machine can use it"),
        (("--host", "0.0.0.0"), "no API key: anyone who can reach it can use it"),
    ):
        result = kimivl(*base, *extra)
        assert result.returncode == 0, result.stderr
        line = next(line for line in result.stderr.splitlines() if line.startswith("serving "))
        assert said in line and re.search(r"at http://[\d.]+:\d+/v1", line), line
    assert "warning: serving on 0.0.0.0 without --api-key" in result.stderr
