"""The OpenAI-compatible client over real loopback HTTP, against scripted stdlib servers."""

from __future__ import annotations

import base64
import io
import itertools
import time

import jsonschema
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from kimivl_cli.backends import ChatOptions, collect
from kimivl_cli.backends.openai import OpenAIBackend, _DeltaParser
from kimivl_cli.engine.events import AnswerDelta, Done, ThinkingDelta
from kimivl_cli.engine.stream import split_thinking
from kimivl_cli.errors import InputError, RuntimeFailure
from tests.backends.conftest import Step, sse_chunks

# The documented shape of a chat-completions request (platform.openai.com API reference), limited
# to what a vision chat sends: text and image_url content parts, sampling fields, streaming.
CHAT_REQUEST_SCHEMA = {
    "type": "object",
    "required": ["model", "messages"],
    "properties": {
        "model": {"type": "string", "minLength": 1},
        "messages": {
            "type": "array",
            "minItems": 1,
            "items": {
                "type": "object",
                "required": ["role", "content"],
                "properties": {
                    "role": {"enum": ["system", "developer", "user", "assistant"]},
                    "content": {
                        "oneOf": [
                            {"type": "string"},
                            {
                                "type": "array",
                                "items": {
                                    "oneOf": [
                                        {
                                            "type": "object",
                                            "required": ["type", "text"],
                                            "properties": {"type": {"const": "text"}, "text": {"type": "string"}},
                                            "additionalProperties": False,
                                        },
                                        {
                                            "type": "object",
                                            "required": ["type", "image_url"],
                                            "properties": {
                                                "type": {"const": "image_url"},
                                                "image_url": {
                                                    "type": "object",
                                                    "required": ["url"],
                                                    "properties": {
                                                        "url": {
                                                            "type": "string",
                                                            "pattern": "^data:image/[a-z]+;base64,[A-Za-z0-9+/]+=*$",
                                                        },
                                                        "detail": {"enum": ["auto", "low", "high"]},
                                                    },
                                                    "additionalProperties": False,
                                                },
                                            },
                                            "additionalProperties": False,
                                        },
                                    ]
                                },
                            },
                        ]
                    },
                },
                "additionalProperties": False,
            },
        },
        "stream": {"type": "boolean"},
        "stream_options": {
            "type": "object",
            "properties": {"include_usage": {"type": "boolean"}},
            "additionalProperties": False,
        },
        "max_tokens": {"type": "integer", "minimum": 1},
        "temperature": {"type": "number", "minimum": 0, "maximum": 2},
        "top_p": {"type": "number", "minimum": 0, "maximum": 1},
        "seed": {"type": "integer"},
    },
    "additionalProperties": False,
}

MESSAGES = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What colour?"}]},
]


def _image() -> Image.Image:
    return Image.new("RGB", (40, 30), (200, 30, 30))


def _backend(url: str, **kw) -> tuple[OpenAIBackend, list[float]]:
    delays: list[float] = []
    kw.setdefault("timeout", 5.0)
    return OpenAIBackend(url, sleep=delays.append, **kw), delays


def test_sent_body_validates_against_the_openai_schema(fake_server) -> None:
    server = fake_server([Step()])
    backend, _ = _backend(server.url, api_key="sk-1")
    completion = collect(backend.chat(MESSAGES, [_image()], ChatOptions(max_tokens=7, temperature=0.0, seed=3)))
    assert completion.answer == "ok"
    sent = server.posts[0]
    jsonschema.validate(sent["body"], CHAT_REQUEST_SCHEMA)
    assert sent["headers"]["Authorization"] == "Bearer sk-1"
    assert sent["path"] == "/v1/chat/completions"
    assert sent["body"]["model"] == "fake-model"  # asked from /v1/models
    assert sent["body"]["max_tokens"] == 7 and sent["body"]["seed"] == 3
    url = sent["body"]["messages"][1]["content"][0]["image_url"]["url"]
    decoded = Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1])))
    assert decoded.size == (40, 30) and decoded.convert("RGB").getpixel((5, 5)) == (200, 30, 30)


def test_schema_is_able_to_fail() -> None:
    bad = {"model": "m", "messages": [{"role": "user", "content": [{"type": "image", "image": "x"}]}]}
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(bad, CHAT_REQUEST_SCHEMA)


def test_image_count_must_match_items() -> None:
    backend, _ = _backend("http://127.0.0.1:9/v1", model="m")
    with pytest.raises(InputError):
        backend.request_body(MESSAGES, [])
    with pytest.raises(InputError):
        backend.request_body(MESSAGES, [_image(), _image()])


def test_retries_500_429_and_a_dropped_connection_then_completes(fake_server) -> None:
    ok = Step(chunks=sse_chunks({"content": "◁think▷hm◁/think▷"}, {"content": " fine"}))
    server = fake_server([Step(status=500), Step(status=429, headers={"Retry-After": "2"}), Step(drop=True), ok])
    backend, delays = _backend(server.url, model="m", max_retries=3, backoff=0.25)
    events = list(backend.chat(MESSAGES, [_image()]))
    assert [e for e in events if not isinstance(e, Done)] == [ThinkingDelta("hm"), AnswerDelta("fine")]
    assert len(server.posts) == 4
    assert delays[1] == 2.0  # Retry-After wins
    assert 0 <= delays[0] <= 0.25 and 0 <= delays[2] <= 1.0  # full jitter under base x 2^n


def test_gives_up_after_the_cap(fake_server) -> None:
    server = fake_server([Step(status=503)])
    backend, delays = _backend(server.url, model="m", max_retries=2, backoff=100, max_backoff=0.5)
    with pytest.raises(RuntimeFailure, match="failed 3 times"):
        list(backend.chat(MESSAGES, [_image()]))
    assert len(server.posts) == 3 and all(d <= 0.5 for d in delays)


def test_401_is_a_clear_error_not_retried(fake_server) -> None:
    server = fake_server([Step(status=401)])
    backend, _ = _backend(server.url, model="m", api_key="wrong")
    with pytest.raises(RuntimeFailure) as info:
        list(backend.chat(MESSAGES, [_image()]))
    assert "API key" in info.value.one_line() and "KIMIVL_API_KEY" in info.value.one_line()
    assert info.value.exit_code == 1 and len(server.posts) == 1


def test_400_is_an_input_error(fake_server) -> None:
    server = fake_server([Step(status=400)])
    backend, _ = _backend(server.url, model="m")
    with pytest.raises(InputError, match="scripted 400"):
        list(backend.chat(MESSAGES, [_image()]))
    assert len(server.posts) == 1


def test_a_stream_cut_after_text_is_not_retried(fake_server) -> None:
    server = fake_server([Step(chunks=sse_chunks({"content": "partial"}), cut_after=1)])
    backend, _ = _backend(server.url, model="m", max_retries=3)
    events = backend.chat(MESSAGES, [_image()])
    assert next(events) == AnswerDelta("partial")
    with pytest.raises(RuntimeFailure, match="mid-answer"):
        list(events)
    assert len(server.posts) == 1


def test_a_stream_cut_before_any_text_is_retried(fake_server) -> None:
    server = fake_server([Step(cut_after=0), Step()])
    backend, _ = _backend(server.url, model="m", max_retries=1)
    assert collect(backend.chat(MESSAGES, [_image()])).answer == "ok"
    assert len(server.posts) == 2


def test_per_request_timeout(fake_server) -> None:
    server = fake_server([Step(delay=1.0)])
    backend, _ = _backend(server.url, model="m", timeout=0.2, max_retries=1)
    start = time.perf_counter()
    with pytest.raises(RuntimeFailure, match="failed 2 times"):
        list(backend.chat(MESSAGES, [_image()]))
    assert time.perf_counter() - start < 1.5


def test_usage_and_finish_reason_reach_done(fake_server) -> None:
    usage = {"prompt_tokens": 11, "completion_tokens": 9, "completion_tokens_details": {"reasoning_tokens": 4}}
    server = fake_server([Step(chunks=sse_chunks({"content": "x"}, usage=usage, finish="length"))])
    backend, _ = _backend(server.url, model="m")
    done = collect(backend.chat(MESSAGES, [_image()])).done
    assert done.finish_reason == "length" and done.model == "fake-model"
    assert (done.usage.prompt_tokens, done.usage.thinking_tokens, done.usage.answer_tokens) == (11, 4, 5)


def test_bad_api_base() -> None:
    with pytest.raises(InputError):
        OpenAIBackend("localhost:8000")


# --- thinking, three ways -------------------------------------------------------------------------


def _parse(deltas: list[dict]) -> tuple[str, str]:
    parser = _DeltaParser(show_thinking=True)
    events = [e for d in deltas for e in parser.feed(d)] + parser.flush()
    thinking = "".join(e.text for e in events if isinstance(e, ThinkingDelta))
    return thinking, "".join(e.text for e in events if isinstance(e, AnswerDelta))


@settings(max_examples=60, deadline=None)
@given(
    thinking=st.text(alphabet="ab ◁▷/\n", max_size=20),
    answer=st.text(alphabet="cd ◁▷/\n", max_size=20),
    cuts=st.lists(st.integers(0, 60), max_size=6),
)
def test_markers_in_content_split_as_the_engine_does(thinking: str, answer: str, cuts: list[int]) -> None:
    text = f"◁think▷{thinking}◁/think▷{answer}"
    points = sorted({0, len(text), *(c for c in cuts if c <= len(text))})
    pieces = [{"content": text[a:b]} for a, b in itertools.pairwise(points)]
    assert _parse(pieces) == split_thinking(text)


@pytest.mark.parametrize("field", ["reasoning_content", "reasoning", "both"])
def test_reasoning_fields_match_markers_in_content(field: str) -> None:
    names = ["reasoning_content", "reasoning"] if field == "both" else [field]
    deltas = [{n: " first " for n in names}, {n: "second\n" for n in names}, {"content": "\n The answer. "}]
    assert _parse(deltas) == split_thinking("◁think▷ first second\n◁/think▷\n The answer. ")
    assert _parse(deltas) == ("first second", "The answer.")


def test_hidden_thinking_is_dropped() -> None:
    parser = _DeltaParser(show_thinking=False)
    events = parser.feed({"reasoning": "secret"}) + parser.feed({"content": "shown"}) + parser.flush()
    assert events == [AnswerDelta("shown")]
