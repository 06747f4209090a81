"""`kimivl serve` does what an OpenAI client asks, or says it cannot: the official `openai` package
over real loopback HTTP against the tiny engine (structured output, stop strings) and scripted
backends (refusals, model names, queue size 0, health checks)."""

from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor

import jsonschema
import openai
import pytest

from kimivl_cli.backends import ChatOptions
from kimivl_cli.backends.openai import image_data_uri
from kimivl_cli.engine.events import JsonFormat
from tests.serve.conftest import ScriptedBackend, http
from tests.serve.test_server import _body, _image, _wait

SCHEMA = {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}


def _client(server, key: str = "none") -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url, api_key=key, max_retries=0, timeout=120)


def _messages() -> list[dict]:
    image = {"type": "image_url", "image_url": {"url": image_data_uri(_image())}}
    return [{"role": "user", "content": [image, {"type": "text", "text": "How many?"}]}]


def test_response_format_json_schema_and_json_object(tiny_backend, start_server) -> None:
    client = _client(start_server(tiny_backend))
    for seed in range(5):
        reply = client.chat.completions.create(
            model=tiny_backend.name,
            messages=_messages(),
            max_tokens=40,
            temperature=1.0,
            seed=seed,
            response_format={"type": "json_schema", "json_schema": {"name": "count", "schema": SCHEMA, "strict": True}},
        )
        jsonschema.validate(json.loads(reply.choices[0].message.content), SCHEMA)
        assert reply.choices[0].finish_reason == "stop"
    stream = client.chat.completions.create(
        model=tiny_backend.name,
        messages=_messages(),
        max_tokens=30,
        seed=1,
        response_format={"type": "json_object"},
        stream=True,
    )
    text = "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)
    assert isinstance(json.loads(text), dict)


def test_stop_strings_end_the_answer_without_them(tiny_backend, start_server) -> None:
    client = _client(start_server(tiny_backend))
    ask = {"model": tiny_backend.name, "messages": _messages(), "max_tokens": 24, "temperature": 0.0}
    free = client.chat.completions.create(**ask).choices[0]
    assert free.finish_reason == "length" and len(free.message.content) > 8
    stop = free.message.content[5:8]
    cut = client.chat.completions.create(**ask, stop=[stop, "never said"]).choices[0]
    assert cut.finish_reason == "stop" and stop not in cut.message.content
    assert free.message.content.startswith(cut.message.content)
    assert cut.message.content == free.message.content[: free.message.content.find(stop)]
    streamed = client.chat.completions.create(**ask, stop=stop, stream=True)
    chunks = list(streamed)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == cut.message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"


def test_what_is_not_supported_is_a_400_that_says_so(start_server) -> None:
    backend = ScriptedBackend()
    client = _client(start_server(backend))
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]
    for extra, needle in (({"tools": tools}, "tools"), ({"n": 2}, "n=1"), ({"stop": [1]}, "stop")):
        with pytest.raises(openai.BadRequestError, match=needle):
            client.chat.completions.create(model="scripted", messages=[{"role": "user", "content": "hi"}], **extra)
    with pytest.raises(openai.BadRequestError, match="response_format"):
        client.chat.completions.create(
            model="scripted", messages=[{"role": "user", "content": "hi"}], response_format={"type": "xml"}
        )
    assert not backend.calls


def test_options_reach_the_backend_as_asked(start_server) -> None:
    backend = ScriptedBackend()
    client = _client(start_server(backend))
    client.chat.completions.create(
        model="scripted",
        messages=[{"role": "user", "content": "hi"}],
        stop="END",
        response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": SCHEMA}},
    )
    options = backend.calls[0][2]
    assert options == ChatOptions(json_format=JsonFormat(SCHEMA), stop=("END",))


def test_unknown_model_names_are_404(start_server) -> None:
    server = start_server(ScriptedBackend(), model_name="kimi-tiny")
    client = _client(server)
    with pytest.raises(openai.NotFoundError) as missing:
        client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}])
    assert missing.value.code == "model_not_found" and "kimi-tiny" in str(missing.value)
    reply = client.chat.completions.create(model="kimi-tiny", messages=[{"role": "user", "content": "hi"}])
    assert reply.model == "kimi-tiny"


def test_queue_size_0_means_no_queue(start_server) -> None:
    backend = ScriptedBackend(answer="a b c d e f", delay=0.1)
    server = start_server(backend, queue_size=0)
    url = server.url + "/chat/completions"
    with ThreadPoolExecutor(1) as pool:
        running = pool.submit(http, "POST", url, _body())
        _wait(lambda: server.worker.running)
        started = time.perf_counter()
        status, headers, _ = http("POST", url, _body())
        assert status == 503 and headers["Retry-After"] == "1" and time.perf_counter() - started < 0.4
        assert running.result()[0] == 200
    assert http("POST", url, _body())[0] == 200  # free again once the first is done


def test_health_needs_no_key_but_everything_else_does(start_server) -> None:
    server = start_server(ScriptedBackend(), api_key="sk-x")
    base = server.url.removesuffix("/v1")
    status, _, payload = http("GET", base + "/health")
    assert status == 200 and json.loads(payload)["status"] == "ok"
    with pytest.raises(openai.AuthenticationError):
        _client(server, "wrong").models.list()
    assert [m.id for m in _client(server, "sk-x").models.list()] == ["scripted"]
