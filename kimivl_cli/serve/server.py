"""`kimivl serve`: an OpenAI-compatible HTTP server over one `ChatBackend`, standard library only.

Routes: `GET /v1/models`, `POST /v1/chat/completions` (`stream: true` -> server-sent events,
`data: {...}` chunks ending with `data: [DONE]`), `GET /health` (no API key needed). Every
response is JSON (or SSE); every failure is an OpenAI-style error object with a status code: 400
bad request (also what is not supported: tools, n > 1), 401 missing/wrong API key, 404 unknown
route or model name, 405, 413 body too large, 503 busy (queue full), 500 a failed generation.
Tracebacks go to the server log, never to the client.

Threads: `ThreadingHTTPServer` gives each connection a thread that parses, queues and writes;
one `Worker` thread runs the model (see `worker`). Hardening: at most `max_connections` connection
threads (more are answered 503 without a thread), an idle or stalled connection is closed after
`IDLE_TIMEOUT` s, a request holds a queue slot before its body is read (a full server refuses
before decoding anything), a refused body is read and dropped so the client sees the refusal, and
a waiting client that disconnects cancels its request.
"""

from __future__ import annotations

import errno
import hmac
import itertools
import json
import logging
import select
import socket
import threading
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from kimivl_cli.backends import ChatBackend
from kimivl_cli.engine.events import Done, ThinkingDelta
from kimivl_cli.errors import InputError, KimivlError
from kimivl_cli.serve.protocol import (
    ChatRequest,
    chunk_json,
    completion_json,
    delta_json,
    error_json,
    finish_reason,
    parse_request,
    usage_json,
)
from kimivl_cli.serve.worker import Job, QueueFull, Slot, Worker

log = logging.getLogger("kimivl.serve")
MAX_BODY_BYTES = 64 << 20  # a few page images as base64
MAX_DISCARD_BYTES = 1 << 30  # a refused body up to this size is read and dropped; beyond, the connection closes
DEFAULT_QUEUE_SIZE = 16
IDLE_TIMEOUT = 30.0  # seconds a connection may sit idle (or stall mid-request) before it is closed
MIN_CONNECTIONS = 64


class HttpError(Exception):
    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.kind, self.code = status, message, kind, code


class ChatServer(ThreadingHTTPServer):
    """The listening socket plus what every handler needs. `url` is the base clients use (…/v1)."""

    daemon_threads = True
    request_queue_size = 256  # listen backlog: bursts wait in the kernel, not refused

    def __init__(
        self,
        backend: ChatBackend,
        host: str = "127.0.0.1",
        port: int = 8000,
        *,
        api_key: str | None = None,
        allow_local_files: bool = False,
        queue_size: int = DEFAULT_QUEUE_SIZE,
        model_name: str | None = None,
        name_field: Callable[[str], str] = lambda field: f"`{field}`",
    ) -> None:
        if queue_size < 0:
            raise InputError("`queue_size` must be at least 0")
        if api_key is not None and not api_key.strip():
            raise InputError("the API key is empty (an unset variable?)", "give a key, or leave out `api_key`")
        self.worker: Worker | None = None
        try:
            super().__init__((host, port), _Handler)
        except OSError as exc:
            hint = "pick another `port`" if isinstance(exc, PermissionError) or exc.errno == errno.EADDRINUSE else None
            raise InputError(
                f"cannot listen on {host}:{port}: {exc.strerror or exc}",
                hint or "check `host` (an address of this machine)",
            ) from None
        self.backend = backend
        self.api_key = api_key
        self._connections = threading.BoundedSemaphore(max(MIN_CONNECTIONS, 2 * (queue_size + 1)))
        self.allow_local_files = allow_local_files
        self.model_name = model_name or backend.name
        self.name_field = name_field  # how messages show an option: the CLI's flag
        self.worker = Worker(backend, queue_size)

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        host = f"[{host}]" if ":" in str(host) else host
        return f"http://{host}:{port}/v1"

    def server_close(self) -> None:
        if self.worker is not None:  # None when binding failed
            self.worker.close()
        super().server_close()

    def process_request(self, request: Any, client_address: Any) -> None:
        """A thread per connection, up to the limit; beyond it a 503 from this thread, no new one.

        The connection's slot is released once, by its thread or here: a SIGTERM can land while the thread
        starts (after it runs), and the stop it raises must reach `serve_forever`, not a double release."""
        if not self._connections.acquire(blocking=False):
            self._refuse(request)
            return
        slot = Slot(self._connections)
        thread = threading.Thread(
            target=self._connection, args=(request, client_address, slot), daemon=self.daemon_threads
        )
        try:
            thread.start()
        except BaseException:
            slot.release()
            raise

    def _connection(self, request: Any, client_address: Any, slot: Slot) -> None:
        try:
            self.process_request_thread(request, client_address)
        finally:
            slot.release()

    def _refuse(self, request: Any) -> None:
        payload = json.dumps(error_json("too many connections; retry later", "server_error", "busy")).encode()
        head = (
            "HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(payload)}\r\nRetry-After: 1\r\nConnection: close\r\n\r\n"
        )
        try:
            request.settimeout(1.0)
            request.sendall(head.encode() + payload)
        except OSError:
            pass
        self.shutdown_request(request)


class _Handler(BaseHTTPRequestHandler):
    server: ChatServer
    protocol_version = "HTTP/1.1"
    server_version = "kimivl"
    timeout = IDLE_TIMEOUT  # the socket's: an idle keep-alive connection or a stalled body ends the thread

    def log_message(self, format: str, *args: Any) -> None:
        log.info("%s %s", self.address_string(), format % args)

    def do_GET(self) -> None:
        self._handle(lambda: self._get())

    def do_POST(self) -> None:
        self._handle(lambda: self._post())

    def _handle(self, route) -> None:
        try:
            if self.path.split("?", 1)[0].rstrip("/") != "/health":  # health checks carry no key
                self._authorize()
            route()
        except HttpError as exc:
            self._send_json(exc.status, error_json(exc.message, exc.kind, exc.code))
        except OSError:  # the client left, or stalled past the timeout
            self.close_connection = True
        except Exception:
            log.exception("request failed")
            self._send_json(500, error_json("internal server error", "server_error"))

    def _authorize(self) -> None:
        key = self.server.api_key
        if key is None:
            return
        given = self.headers.get("Authorization", "")
        scheme, _, token = given.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), key.encode()):
            self._drain_body()
            raise HttpError(401, "missing or wrong API key (send 'Authorization: Bearer KEY')", code="invalid_api_key")

    # --- routes --------------------------------------------------------------------------------

    def _get(self) -> None:
        path = self.path.split("?", 1)[0].rstrip("/")
        if path == "/v1/models":
            model = {"id": self.server.model_name, "object": "model", "created": 0, "owned_by": "kimivl"}
            self._send_json(200, {"object": "list", "data": [model]})
        elif path == "/health":
            worker = self.server.worker
            self._send_json(
                200,
                {
                    "status": "ok",
                    "model": self.server.model_name,
                    "running": worker.running,
                    "waiting": worker.waiting,
                    "queue_size": worker.queue_size,
                    "served": worker.served,
                },
            )
        elif path == "/v1/chat/completions":
            raise HttpError(405, "use POST for /v1/chat/completions")
        else:
            raise HttpError(404, f"no route {path or '/'}", code="not_found")

    def _post(self) -> None:
        path = self.path.split("?", 1)[0].rstrip("/")
        if path != "/v1/chat/completions":
            self._drain_body()
            raise HttpError(404 if path not in ("/v1/models", "/health") else 405, f"no POST route {path or '/'}")
        worker = self.server.worker
        assert worker is not None
        try:
            slot = worker.reserve()  # before the body is read or an image decoded
        except QueueFull:
            self._drain_body()
            raise HttpError(
                503, "the server is busy: its request queue is full; retry later", "server_error", "queue_full"
            ) from None
        try:
            body = self._read_json()
            model = body.get("model") if isinstance(body, dict) else None
            if model is not None and model != self.server.model_name:
                raise HttpError(
                    404,
                    f"the model {model!r} does not exist: this server serves {self.server.model_name!r}",
                    code="model_not_found",
                )
            try:
                request = parse_request(body, self.server.allow_local_files)
            except KimivlError as exc:
                raise HttpError(400, exc.one_line(self.server.name_field)) from None
            job = worker.submit(request, slot)
        except BaseException:
            slot.release()
            raise
        items = job.items(client_gone=self._client_gone)
        try:
            first = next(items, None)
            if isinstance(first, KimivlError):  # raised before anything was generated
                status = 400 if isinstance(first, InputError) else 500
                raise HttpError(
                    status,
                    first.one_line(self.server.name_field),
                    "invalid_request_error" if status == 400 else "server_error",
                )
            if request.stream:
                self._stream(request, job, first, items)
            else:
                self._complete(request, first, items)
        finally:
            job.cancelled.set()  # no-op when finished; stops the worker when the client left

    # --- responses -----------------------------------------------------------------------------

    def _complete(self, request: ChatRequest, first: Any, items: Iterator[Any]) -> None:
        thinking: list[str] = []
        answer: list[str] = []
        done = Done()
        for item in itertools.chain([first], items):
            if isinstance(item, KimivlError):
                raise HttpError(500, item.one_line(self.server.name_field), "server_error")
            if isinstance(item, Done):
                done = item
            elif item is not None:
                (thinking if isinstance(item, ThinkingDelta) else answer).append(item.text)
        self._send_json(200, completion_json(request, self.server.model_name, "".join(thinking), "".join(answer), done))

    def _stream(self, request: ChatRequest, job: Job, first: Any, items: Iterator[Any]) -> None:
        model = self.server.model_name
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream; charset=utf-8")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Connection", "close")
        self.end_headers()
        self.close_connection = True
        self._event(chunk_json(request, model, {"role": "assistant", "content": ""}))
        for item in itertools.chain([first] if first is not None else [], items):
            if isinstance(item, KimivlError):
                self._event(error_json(item.one_line(self.server.name_field), "server_error"))
                break
            if isinstance(item, Done):
                usage = usage_json(item)
                self._event(chunk_json(request, model, {}, finish_reason(item), usage))
                if request.include_usage:
                    self._event(chunk_json(request, model, None, usage=usage))
            else:
                self._event(chunk_json(request, model, delta_json(item)))
        self.wfile.write(b"data: [DONE]\n\n")
        self.wfile.flush()

    def _event(self, data: dict[str, Any]) -> None:
        self.wfile.write(b"data: " + json.dumps(data, ensure_ascii=False).encode() + b"\n\n")
        self.wfile.flush()

    def _send_json(self, status: int, data: dict[str, Any]) -> None:
        payload = json.dumps(data, ensure_ascii=False).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        if status == 503:
            self.send_header("Retry-After", "1")
        if status == 401:
            self.send_header("WWW-Authenticate", "Bearer")
        self.end_headers()
        self.wfile.write(payload)
        self.wfile.flush()

    # --- request bodies ------------------------------------------------------------------------

    def _content_length(self) -> int:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            self.close_connection = True
            raise HttpError(411, "send the body with a Content-Length (chunked bodies are not read)")
        try:
            length = int(self.headers.get("Content-Length", "0"))
        except ValueError:
            self.close_connection = True
            raise HttpError(400, "bad Content-Length") from None
        if length < 0:
            self.close_connection = True
            raise HttpError(400, "bad Content-Length")
        return length

    def _client_gone(self) -> bool:
        """Whether the client closed its connection while its request waits (readable, yet no byte
        to read). A client that half-closes after sending its request counts as gone."""
        try:
            readable, _, _ = select.select([self.connection], [], [], 0)
            return bool(readable) and self.connection.recv(1, socket.MSG_PEEK) == b""
        except (OSError, ValueError):
            return True

    def _drain_body(self) -> None:
        """Read and drop a body we refuse, in pieces: the client, which sends all of it before it
        reads, then sees our answer instead of a broken pipe; the connection can carry the next
        request. Bodies over `MAX_DISCARD_BYTES` are not read: the connection closes."""
        try:
            length = self._content_length()
        except HttpError:
            return
        if length > MAX_DISCARD_BYTES:
            self.close_connection = True
            return
        while length > 0 and (chunk := self.rfile.read(min(length, 1 << 16))):
            length -= len(chunk)

    def _read_json(self) -> Any:
        length = self._content_length()
        if length > MAX_BODY_BYTES:
            self._drain_body()
            self.close_connection = True
            raise HttpError(413, f"request body over {MAX_BODY_BYTES >> 20} MiB", code="body_too_large")
        raw = self.rfile.read(length)
        try:
            return json.loads(raw)
        except (ValueError, UnicodeDecodeError) as exc:
            raise HttpError(400, f"the body is not valid JSON: {str(exc)[:200]}") from None
        except RecursionError:
            raise HttpError(400, "the body's JSON is nested too deeply") from None
