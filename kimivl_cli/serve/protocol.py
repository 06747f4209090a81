"""The chat-completions wire format: request JSON -> `ChatRequest`, events -> response JSON.

Only what the OpenAI API documents (and vLLM/SGLang add for reasoning) is read or written.
Requests are checked up front so that every problem is a 400 with a message, never a crash
in the worker. Images: `data:` URIs always; `file://` URLs only when the server allows local
files; web URLs never (the server fetches nothing).
"""

from __future__ import annotations

import base64
import binascii
import math
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote, urlsplit

from kimivl_cli.backends import ChatOptions
from kimivl_cli.engine.events import Done, Event, JsonFormat, ThinkingDelta
from kimivl_cli.errors import InputError

if TYPE_CHECKING:
    from PIL import Image

ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}


@dataclass
class ChatRequest:
    """A checked request: `processor.chat` messages, their images in order, options."""

    messages: list[dict[str, Any]]
    images: list[Image.Image]
    options: ChatOptions
    stream: bool = False
    include_usage: bool = False
    id: str = field(default_factory=lambda: f"chatcmpl-{uuid.uuid4().hex}")
    created: int = field(default_factory=lambda: int(time.time()))


def parse_request(body: Any, allow_local_files: bool) -> ChatRequest:
    """Raise InputError (-> 400) for anything we cannot serve as asked."""
    if not isinstance(body, dict):
        raise InputError("the request body must be a JSON object")
    raw_messages = body.get("messages")
    if not isinstance(raw_messages, list) or not raw_messages:
        raise InputError("'messages' must be a non-empty list")
    if body.get("n") not in (None, 1):
        raise InputError(f"n={body['n']!r}: only n=1 is supported (one choice per request)", "send n requests")
    if body.get("tools") or body.get("functions"):
        raise InputError("tools and functions are not supported: this server has no tool-calling format")
    messages: list[dict[str, Any]] = []
    images: list[Image.Image] = []
    for i, message in enumerate(raw_messages):
        if not isinstance(message, dict):
            raise InputError(f"messages[{i}] must be an object")
        role = ROLES.get(message.get("role"))  # type: ignore[arg-type]
        if role is None:
            raise InputError(
                f"messages[{i}].role {message.get('role')!r} is not supported", "use system, user or assistant"
            )
        messages.append({"role": role, "content": _content(message.get("content"), i, images, allow_local_files)})
    stream_options = body.get("stream_options") or {}
    return ChatRequest(
        messages=messages,
        images=images,
        options=ChatOptions(
            max_tokens=_number(body, "max_completion_tokens", int) or _number(body, "max_tokens", int),
            temperature=_number(body, "temperature", float),
            top_p=_number(body, "top_p", float),
            seed=_number(body, "seed", int),
            thinking_budget=_number(body, "thinking_budget", int),
            json_format=_response_format(body.get("response_format")),
            stop=_stop(body.get("stop")),
        ),
        stream=bool(body.get("stream", False)),
        include_usage=isinstance(stream_options, dict) and bool(stream_options.get("include_usage")),
    )


def _response_format(value: Any) -> JsonFormat | None:
    """OpenAI's `response_format`: text (None), json_object, or json_schema {name, schema, strict}."""
    if value is None:
        return None
    kind = value.get("type") if isinstance(value, dict) else None
    if kind == "text":
        return None
    if kind == "json_object":
        return JsonFormat()
    if kind == "json_schema":
        spec = value.get("json_schema")
        schema = spec.get("schema") if isinstance(spec, dict) else None
        if not isinstance(schema, dict):
            raise InputError("response_format.json_schema.schema must be a JSON Schema object")
        return JsonFormat(schema)
    raise InputError(f"response_format type {kind!r} is not supported", "use text, json_object or json_schema")


def _stop(value: Any) -> tuple[str, ...]:
    """OpenAI's `stop`: a string or a list of up to 4 strings."""
    if value is None:
        return ()
    stops = [value] if isinstance(value, str) else value
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops) or len(stops) > 4:
        raise InputError("'stop' must be a string or a list of up to 4 strings")
    return tuple(s for s in stops if s)


def _number(body: Mapping[str, Any], key: str, kind: type) -> Any:
    value = body.get(key)
    if value is None:
        return None
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or not math.isfinite(value)
        or (kind is int and value != int(value))
    ):
        shown = repr(value) if len(repr(value)) <= 40 else f"{repr(value)[:37]}..."
        raise InputError(f"'{key}' must be {'an integer' if kind is int else 'a finite number'}, got {shown}")
    return kind(value)


def _content(content: Any, i: int, images: list[Image.Image], allow_local_files: bool) -> str | list[dict[str, Any]]:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise InputError(f"messages[{i}].content must be a string or a list of parts")
    items: list[dict[str, Any]] = []
    for j, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str):
            items.append({"type": "text", "text": part["text"]})
        elif kind == "image_url":
            ref = part.get("image_url")
            url = ref.get("url") if isinstance(ref, dict) else ref
            if not isinstance(url, str):
                raise InputError(f"messages[{i}].content[{j}].image_url needs a 'url' string")
            images.extend(load_image_url(url, allow_local_files))
            items.append({"type": "image"})
        else:
            raise InputError(f"messages[{i}].content[{j}]: unsupported part {kind!r}", "use text and image_url parts")
    return items


def load_image_url(url: str, allow_local_files: bool) -> list[Image.Image]:
    """A `data:` URI or (when allowed) a `file://` URL -> the image; everything else is refused."""
    from kimivl_cli.media.images import load_images

    scheme = url.split(":", 1)[0].lower()
    if scheme == "data":
        header, sep, payload = url.partition(",")
        if not sep or not header.endswith(";base64"):
            raise InputError("image data URIs must be base64: data:image/png;base64,...")
        try:
            data = base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError):
            raise InputError("an image data URI is not valid base64") from None
        pages = load_images(data, max_pages=1)
    elif scheme == "file":
        if not allow_local_files:
            raise InputError("file:// image URLs are refused", "start the server with `allow_local_files`")
        path = Path(unquote(urlsplit(url).path))
        if not path.is_file():
            raise InputError(f"no such image file on the server: {path}")
        pages = load_images(path, max_pages=1)
    else:
        raise InputError(f"image URL scheme {scheme!r} is not served", "send the image as a base64 data URI")
    return pages  # one image_url part is one image (a multipage TIFF gives its first page, the only one decoded)


# --- responses --------------------------------------------------------------------------------


def usage_json(done: Done) -> dict[str, Any]:
    u = done.usage
    return {
        "prompt_tokens": u.prompt_tokens,
        "completion_tokens": u.completion_tokens,
        "total_tokens": u.prompt_tokens + u.completion_tokens,
        "completion_tokens_details": {"reasoning_tokens": u.thinking_tokens},
    }


def finish_reason(done: Done) -> str:
    return "length" if done.finish_reason == "length" else "stop"


def delta_json(event: Event) -> dict[str, Any]:
    """A thinking or answer event as a delta; thinking goes in both fields current clients read."""
    if isinstance(event, ThinkingDelta):
        return {"reasoning_content": event.text, "reasoning": event.text}
    return {"content": event.text}


def chunk_json(
    req: ChatRequest, model: str, delta: dict[str, Any] | None, finish: str | None = None, usage: Any = None
) -> dict[str, Any]:
    chunk: dict[str, Any] = {
        "id": req.id,
        "object": "chat.completion.chunk",
        "created": req.created,
        "model": model,
        "choices": [] if delta is None else [{"index": 0, "delta": delta, "finish_reason": finish}],
    }
    if usage is not None:
        chunk["usage"] = usage
    return chunk


def completion_json(req: ChatRequest, model: str, thinking: str, answer: str, done: Done) -> dict[str, Any]:
    message: dict[str, Any] = {"role": "assistant", "content": answer}
    if thinking:
        message["reasoning_content"] = thinking
        message["reasoning"] = thinking
    return {
        "id": req.id,
        "object": "chat.completion",
        "created": req.created,
        "model": model,
        "choices": [{"index": 0, "message": message, "finish_reason": finish_reason(done)}],
        "usage": usage_json(done),
    }


def error_json(message: str, kind: str = "invalid_request_error", code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": kind, "param": None, "code": code}}
