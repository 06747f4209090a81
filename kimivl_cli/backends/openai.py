"""An OpenAI-compatible chat-completions server as a `ChatBackend` (vLLM, SGLang, `kimivl serve`).

Standard library only (`http.client`): one connection per request, the reply streamed as
server-sent events (`data: {...}` lines ending with `data: [DONE]`). Thinking arrives in one of
three ways and all give the events the local engine gives: `◁think▷…◁/think▷` inside `content`
(vLLM, which has no Kimi-VL reasoning parser), or split out into `reasoning_content` or
`reasoning` (SGLang's kimi parser, `kimivl serve`). Both fields are read, never both at once.

Failures: connection errors, timeouts, 429 and 5xx are retried with capped exponential backoff
and full jitter (`Retry-After` honoured, capped too), as long as nothing was yielded yet; a
stream cut after its first delta is an error, since retrying would repeat text. Other 4xx are
not retried: 400/413/422 -> `InputError`, 401/403 -> `RuntimeFailure` naming the API key,
others -> `RuntimeFailure`.
"""

from __future__ import annotations

import base64
import http.client
import io
import json
import random
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any, NoReturn
from urllib.parse import urlsplit

from kimivl_cli.backends import ChatOptions, ServerSide
from kimivl_cli.engine.events import Done, Event, JsonFormat, ThinkingDelta, Timings, Usage
from kimivl_cli.engine.stream import ThinkingSplitter
from kimivl_cli.errors import InputError, RuntimeFailure
from kimivl_cli.processor.chat import THINK_END, THINK_START, is_image_item

if TYPE_CHECKING:
    from PIL import Image

    from kimivl_cli.processor.chat import Message

RETRY_STATUSES = frozenset({408, 429, 500, 502, 503, 504})
API_KEY_HINT = "pass `api_key` or set KIMIVL_API_KEY to the server's key"


class _Retryable(Exception):
    """One attempt failed in a way worth another try; `delay` is the server's Retry-After, if any."""

    def __init__(self, message: str, delay: float | None = None) -> None:
        super().__init__(message)
        self.delay = delay


def image_data_uri(image: Image.Image, fmt: str = "PNG") -> str:
    """A PIL image as a `data:` URI (PNG by default: lossless, what OCR wants)."""
    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, format=fmt)
    mime = "jpeg" if fmt.upper() in ("JPG", "JPEG") else fmt.lower()
    return f"data:image/{mime};base64,{base64.b64encode(buffer.getvalue()).decode('ascii')}"


def to_openai_messages(
    messages: Sequence[Message], images: Sequence[Image.Image], image_format: str = "PNG"
) -> list[dict[str, Any]]:
    """`processor.chat` messages (`{"type": "image"}` items) -> chat-completions messages with image_url parts."""
    pending = iter(images)
    used = 0
    out = []
    for message in messages:
        content = message.get("content")
        if isinstance(content, str):
            out.append({"role": message["role"], "content": content})
            continue
        parts = []
        for item in content or []:
            if "image_url" in item:
                parts.append({"type": "image_url", "image_url": item["image_url"]})
            elif is_image_item(item):
                image = next(pending, None)
                if image is None:
                    raise InputError(f"the messages hold more image items than the {len(images)} images given")
                used += 1
                parts.append({"type": "image_url", "image_url": {"url": image_data_uri(image, image_format)}})
            else:
                parts.append({"type": "text", "text": item["text"]})
        out.append({"role": message["role"], "content": parts})
    if used != len(images):
        raise InputError(f"{len(images)} images given but the messages hold {used} image items")
    return out


class _DeltaParser:
    """Chat-completion deltas -> the engine's thinking/answer deltas, through the engine's own splitter.

    Reasoning fields are fed to the splitter wrapped in the markers the model writes, so
    whitespace and marker handling are exactly the local engine's, whichever way they arrive.
    """

    def __init__(self, show_thinking: bool) -> None:
        self.splitter = ThinkingSplitter(show_thinking)
        self.show_thinking = show_thinking
        self._reasoning_open = False
        self._answer_seen = False

    def feed(self, delta: dict[str, Any]) -> list[Event]:
        out: list[Event] = []
        reasoning = delta.get("reasoning_content") or delta.get("reasoning")
        if isinstance(reasoning, str) and reasoning:
            if self._answer_seen:  # reasoning after the answer began: pass it on as it is
                out += [ThinkingDelta(reasoning)] if self.show_thinking else []
            elif self._reasoning_open:
                out += self.splitter.feed(reasoning)
            else:
                self._reasoning_open = True
                out += self.splitter.feed(THINK_START + reasoning)
        content = delta.get("content")
        if isinstance(content, str) and content:
            if self._reasoning_open:
                self._reasoning_open = False
                content = THINK_END + content
            self._answer_seen = True
            out += self.splitter.feed(content)
        return out

    def flush(self) -> list[Event]:
        return list(self.splitter.flush())


def response_format(fmt: JsonFormat | None) -> dict[str, Any] | None:
    """OpenAI's `response_format` for a `JsonFormat` (json_schema, strict; or json_object)."""
    if fmt is None:
        return None
    if fmt.schema is None:
        return {"type": "json_object"}
    return {"type": "json_schema", "json_schema": {"name": "answer", "schema": fmt.schema, "strict": True}}


class OpenAIBackend(ServerSide):
    """Chat completions from `api_base` (e.g. `http://gpu-node:8000/v1`), streamed.

    `model`: the name to ask for; None asks `/v1/models` once and takes the first. `timeout`:
    seconds the connection may stay silent (connect, or between two reads) before the attempt
    fails. `max_retries` retries after the first attempt, waiting `backoff` x 2^n seconds
    (full jitter, at most `max_backoff`). Safe to share between threads (nothing is shared
    between requests but the model name, looked up under a lock).
    """

    def __init__(
        self,
        api_base: str,
        api_key: str | None = None,
        model: str | None = None,
        timeout: float = 600.0,
        max_retries: int = 5,
        backoff: float = 0.5,
        max_backoff: float = 30.0,
        image_format: str = "PNG",
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        url = urlsplit(api_base.rstrip("/"))
        if url.scheme not in ("http", "https") or not url.hostname:
            raise InputError(f"`api_base` {api_base!r} is not an http(s) URL", "e.g. http://localhost:8000/v1")
        self.api_base = api_base.rstrip("/")
        self._scheme = url.scheme
        self._netloc = url.netloc.rpartition("@")[2]
        self._path = url.path if url.path not in ("", "/") else "/v1"
        self.api_key = api_key
        self.timeout = timeout
        self.max_retries = max_retries
        self.backoff = backoff
        self.max_backoff = max_backoff
        self.image_format = image_format
        self._sleep = sleep
        self._model = model
        self._model_lock = threading.Lock()
        self.notes: list[str] = []  # what of the user's options the server side ignores (filled by the caller)

    def option_notes(self, options: ChatOptions) -> list[str]:
        if options.thinking_budget is None:
            return []
        return [
            f"`thinking_budget` {options.thinking_budget} is sent as the request field thinking_budget: "
            "kimivl serve honours it, vLLM and SGLang ignore it"
        ]

    @property
    def name(self) -> str:
        """The model asked for: `model`, else the server's first, listed once (not once per thread)."""
        with self._model_lock:
            if self._model is None:
                self._model = self._first_model()
            return self._model

    # --- requests ----------------------------------------------------------------------------

    def request_body(
        self, messages: Sequence[Message], images: Sequence[Image.Image], options: ChatOptions = ChatOptions()
    ) -> dict[str, Any]:
        """The JSON body of a streamed chat-completions request (public so tests can check its shape)."""
        body: dict[str, Any] = {
            "model": self.name,
            "messages": to_openai_messages(messages, images, self.image_format),
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        fields = {
            "max_tokens": options.max_tokens,
            "temperature": options.temperature,
            "top_p": options.top_p,
            "seed": options.seed,
            "thinking_budget": options.thinking_budget,  # kimivl serve's extension; others ignore it
            "response_format": response_format(options.json_format),
            "stop": list(options.stop) or None,
        }
        body.update({k: v for k, v in fields.items() if v is not None})
        return body

    def chat(
        self, messages: Sequence[Message], images: Sequence[Image.Image], options: ChatOptions = ChatOptions()
    ) -> Iterator[Event]:
        """Stream one completion as engine events: ThinkingDelta* AnswerDelta* Done.

        Request errors (bad messages, 4xx, retries used up) are raised on the first `next`.
        """
        body = json.dumps(self.request_body(messages, images, options)).encode()
        return self._stream(body, options.show_thinking)

    def _stream(self, body: bytes, show_thinking: bool) -> Iterator[Event]:
        for attempt in range(self.max_retries + 1):
            started = time.perf_counter()
            yielded = False
            try:
                conn, response = self._open("POST", "/chat/completions", body)
                try:
                    parser = _DeltaParser(show_thinking)
                    done: dict[str, Any] = {}
                    first_at = None
                    for chunk in _sse_json(response):
                        if "error" in chunk:
                            raise RuntimeFailure(f"the server failed mid-answer: {_error_message(chunk)}")
                        _merge_done(done, chunk)
                        for choice in chunk.get("choices") or []:
                            for event in parser.feed(choice.get("delta") or {}):
                                first_at = first_at or time.perf_counter()
                                yielded = True
                                yield event
                    for event in parser.flush():
                        yielded = True
                        yield event
                finally:
                    conn.close()
                end = time.perf_counter()
                first_at = first_at or end
                yield _done_event(done, started, first_at, end, self._model or "")
                return
            except (_Retryable, OSError, http.client.HTTPException) as exc:
                if yielded:
                    raise RuntimeFailure(f"the connection to {self.api_base} broke mid-answer: {exc}") from None
                if attempt == self.max_retries:
                    raise RuntimeFailure(
                        f"{self.api_base} failed {attempt + 1} times, last: {exc}",
                        "check that the server is up and `api_base` points at it",
                    ) from None
                self._sleep(self._delay(attempt, getattr(exc, "delay", None)))

    def _first_model(self) -> str:
        attempt = 0
        while True:
            try:
                conn, response = self._open("GET", "/models", None)
                try:
                    data = json.loads(response.read())
                finally:
                    conn.close()
                listed = data.get("data") if isinstance(data, dict) else None
                models = [m.get("id") for m in listed or [] if isinstance(m, dict)]
                if not models or not isinstance(models[0], str):
                    raise RuntimeFailure(f"{self.api_base}/models lists no model", "pass `model` NAME")
                return models[0]
            except (_Retryable, OSError, http.client.HTTPException, ValueError) as exc:
                if attempt == self.max_retries:
                    raise RuntimeFailure(f"cannot list the models of {self.api_base}: {exc}") from None
                self._sleep(self._delay(attempt, getattr(exc, "delay", None)))
                attempt += 1

    def _open(
        self, method: str, path: str, body: bytes | None
    ) -> tuple[http.client.HTTPConnection, http.client.HTTPResponse]:
        """Send one request; a 2xx response is returned open, anything else raised (retryable or final)."""
        cls = http.client.HTTPSConnection if self._scheme == "https" else http.client.HTTPConnection
        conn = cls(self._netloc, timeout=self.timeout)
        headers = {"Accept": "text/event-stream" if body else "application/json"}
        if body is not None:
            headers["Content-Type"] = "application/json"
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        try:
            conn.request(method, self._path + path, body=body, headers=headers)
            response = conn.getresponse()
            if 200 <= response.status < 300:
                return conn, response
            text = response.read(65536)
        except BaseException:
            conn.close()
            raise
        conn.close()
        self._raise_for_status(response, path, text)

    def _raise_for_status(self, response: http.client.HTTPResponse, path: str, text: bytes) -> NoReturn:
        status = response.status
        message = _error_message(text)
        where = f"{self.api_base}{path}"
        if status in RETRY_STATUSES:
            raise _Retryable(f"HTTP {status} from {where}: {message}", _retry_after(response))
        if status in (401, 403):
            key = "the API key was refused" if self.api_key else "the server wants an API key"
            raise RuntimeFailure(f"{where}: {key} (HTTP {status}: {message})", API_KEY_HINT)
        if status in (400, 413, 422):
            raise InputError(f"{where} rejected the request (HTTP {status}): {message}")
        if status == 404:
            raise RuntimeFailure(
                f"{where}: not found (HTTP 404: {message})", "check `api_base` (it usually ends in /v1) and `model`"
            )
        raise RuntimeFailure(f"{where}: HTTP {status}: {message}")

    def _delay(self, attempt: int, server_delay: float | None) -> float:
        """Full jitter: uniform in [0, min(cap, base x 2^attempt)]; the server's Retry-After wins, capped."""
        if server_delay is not None:
            return min(self.max_backoff, max(0.0, server_delay))
        return random.uniform(0, min(self.max_backoff, self.backoff * 2**attempt))


# --- wire format helpers ---------------------------------------------------------------------


def _sse_json(response: http.client.HTTPResponse) -> Iterator[dict[str, Any]]:
    """The JSON objects of a server-sent event stream, up to `data: [DONE]` (or the end of the body)."""
    data: list[str] = []
    while True:
        raw = response.readline(1 << 24)
        if not raw:
            if data:
                raise _Retryable("the event stream ended inside an event")
            return
        line = raw.decode("utf-8").rstrip("\r\n")
        if line.startswith("data:"):
            data.append(line[5:].removeprefix(" "))
            continue
        if line or not data:
            continue  # comments (`: ping`), other fields, blank keep-alives
        payload = "\n".join(data)
        data = []
        if payload.strip() == "[DONE]":
            return
        try:
            chunk = json.loads(payload)
        except ValueError:
            raise RuntimeFailure(f"the server sent an event that is not JSON: {payload[:200]!r}") from None
        if isinstance(chunk, dict):
            yield chunk


def _merge_done(done: dict[str, Any], chunk: dict[str, Any]) -> None:
    """Keep what the final `Done` needs: usage, finish reason, model name (whichever chunk has them)."""
    if isinstance(chunk.get("usage"), dict):
        done["usage"] = chunk["usage"]
    if isinstance(chunk.get("model"), str):
        done["model"] = chunk["model"]
    for choice in chunk.get("choices") or []:
        if choice.get("finish_reason"):
            done["finish_reason"] = choice["finish_reason"]


def _done_event(done: dict[str, Any], started: float, first_at: float, end: float, model: str) -> Done:
    usage = done.get("usage") or {}
    completion = int(usage.get("completion_tokens") or 0)
    details = usage.get("completion_tokens_details") or {}
    reasoning = int(details.get("reasoning_tokens") or 0) if isinstance(details, dict) else 0
    reason = done.get("finish_reason")
    return Done(
        finish_reason="length" if reason == "length" else "stop",
        usage=Usage(
            prompt_tokens=int(usage.get("prompt_tokens") or 0),
            thinking_tokens=reasoning,
            answer_tokens=max(0, completion - reasoning),
        ),
        # Remote: `prefill_s` is the wait for the first delta (queue + network + prefill).
        timings=Timings(prefill_s=first_at - started, decode_s=end - first_at),
        model=done.get("model") or model,
    )


def _error_message(body: bytes | dict[str, Any]) -> str:
    """The `error.message` of an OpenAI-style error body, else the start of the body."""
    data: Any = body
    if isinstance(body, bytes):
        try:
            data = json.loads(body)
        except ValueError:
            return body.decode("utf-8", "replace").strip()[:300] or "(empty body)"
    error = data.get("error") if isinstance(data, dict) else None
    if isinstance(error, dict) and error.get("message"):
        return str(error["message"])
    if isinstance(error, str):
        return error
    return json.dumps(data)[:300]


def _retry_after(response: http.client.HTTPResponse) -> float | None:
    value = response.getheader("Retry-After")
    try:
        return float(value) if value is not None else None
    except ValueError:
        return None


__all__ = ["OpenAIBackend", "image_data_uri", "to_openai_messages"]
