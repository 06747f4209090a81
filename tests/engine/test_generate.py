"""`Engine.generate` end to end on a generated tiny checkpoint: text, images, streaming, thinking."""

from __future__ import annotations

import re

import pytest
import torch

import kimivl_cli.engine.engine as engine_module
from kimivl_cli.cli.flags import error_line
from kimivl_cli.engine.engine import Engine
from kimivl_cli.engine.events import AnswerDelta, Done, ThinkingDelta
from kimivl_cli.engine.sampling import SamplingParams
from kimivl_cli.errors import InputError
from kimivl_cli.processor.chat import THINK_END, THINK_START


def user(*items: dict | str) -> list[dict]:
    content = [{"type": "text", "text": i} if isinstance(i, str) else i for i in items]
    return [{"role": "user", "content": content}]


IMAGE = {"type": "image"}


def run(engine: Engine, messages, images=None, **kw) -> tuple[list, Done]:
    events = list(engine.generate(messages, images, **kw))
    assert all(not isinstance(e, Done) for e in events[:-1]) and isinstance(events[-1], Done)
    return events[:-1], events[-1]


@pytest.mark.parametrize("n_images", [0, 1, 3])
def test_generate_text_and_images(tiny_engine: Engine, photos, n_images: int) -> None:
    params = SamplingParams(temperature=0.7, top_p=0.9, seed=1, max_new_tokens=16)
    messages = user(*[IMAGE] * n_images, "What is in these pictures?")
    deltas, done = run(tiny_engine, messages, photos[:n_images], params=params)
    assert all(isinstance(d, AnswerDelta | ThinkingDelta) for d in deltas)
    usage = done.usage
    assert usage.image_tokens == {0: 0, 1: 4, 3: 4 + 3 + 6}[n_images]
    assert usage.prompt_tokens > usage.image_tokens
    assert 1 <= usage.completion_tokens <= 16
    assert done.finish_reason in ("stop", "length") and done.model
    # "length" exactly when the reply used its whole budget (a stop token is not counted).
    assert done.finish_reason == ("length" if usage.completion_tokens == 16 else "stop")
    assert done.timings.prefill_s > 0 and done.timings.decode_s > 0 and (done.timings.vision_s > 0) == bool(n_images)
    # Same seed, same output; the images now come from the feature cache.
    again, done2 = run(tiny_engine, messages, photos[:n_images], params=params)
    assert again == deltas and done2.usage == usage


def test_streamed_text_is_the_decoded_text(tiny_engine: Engine, monkeypatch) -> None:
    """Deltas are whole characters even when one character spans tokens (a 3-byte CJK char here)."""
    tok = tiny_engine.tokenizer
    script = tok.encode("ok 猫 and ✓ done", allow_special=False)
    assert any(not tok.token_bytes(t).decode("utf-8", "ignore") for t in script)  # some token is a partial char
    feed_script(monkeypatch, [*script, tok.im_end_id])
    deltas, done = run(tiny_engine, user("hi"), params=SamplingParams(max_new_tokens=50))
    assert "".join(d.text for d in deltas) == "ok 猫 and ✓ done"
    assert all("\ufffd" not in d.text for d in deltas)
    assert done.finish_reason == "stop" and done.usage.answer_tokens == len(script)


def feed_script(monkeypatch, script: list[int], then: int | None = None) -> list[list[int]]:
    """Make the sampler emit `script`, then `then` forever; returns the token chunks the model was fed."""
    queue = list(script)
    fed: list[list[int]] = []

    def scripted(logits, params, generator=None, prev_tokens=None):
        return torch.tensor([queue.pop(0) if queue else then], device=logits.device)

    real_step = Engine.decode_step

    def recording_step(self, tokens, positions, cache, kv_len):
        fed.append(tokens[0].tolist())
        return real_step(self, tokens, positions, cache, kv_len)

    monkeypatch.setattr(engine_module, "sample", scripted)
    monkeypatch.setattr(Engine, "decode_step", recording_step)
    return fed


@pytest.mark.parametrize("show", [True, False])
def test_thinking_budget_forces_the_end_marker_then_answers(tiny_engine: Engine, monkeypatch, show: bool) -> None:
    tok = tiny_engine.tokenizer
    start, end = tok.encode(THINK_START, allow_special=False), tok.encode(THINK_END, allow_special=False)
    word = tok.encode("a", allow_special=False)
    assert len(word) == 1
    fed = feed_script(monkeypatch, start, then=word[0])
    params = SamplingParams(temperature=0.0, max_new_tokens=40, thinking_budget=4)
    deltas, done = run(tiny_engine, user("think"), params=params, show_thinking=show)
    tokens = [t for chunk in fed for t in chunk]  # everything but the last token went through the model
    assert tokens[: len(start) + 4 + len(end)] == start + word * 4 + end  # the marker right after 4 tokens
    assert tokens[len(start) + 4 + len(end) :] == word * (40 - len(start) - 4 - len(end) - 1)
    thinking = "".join(d.text for d in deltas if isinstance(d, ThinkingDelta))
    answer = "".join(d.text for d in deltas if isinstance(d, AnswerDelta))
    assert thinking == ("aaaa" if show else "")
    assert answer == "a" * (40 - len(start) - 4 - len(end))
    assert done.usage.thinking_tokens == len(start) + 4 + len(end)
    assert done.usage.completion_tokens == 40 and done.finish_reason == "length"
    assert done.timings.thinking_s > 0


def test_stops_on_tokenizer_end_ids_not_hard_coded(tiny_engine: Engine, monkeypatch) -> None:
    tok = tiny_engine.tokenizer
    assert set(tiny_engine.stop_ids) == {tok.token_id("<|im_end|>"), tok.token_id("[EOS]")}
    feed_script(monkeypatch, [*tok.encode("a b", allow_special=False), tok.eos_id, 5, 6])
    deltas, done = run(tiny_engine, user("x"), params=SamplingParams(max_new_tokens=50))
    assert "".join(d.text for d in deltas) == "a b" and done.finish_reason == "stop"


def test_closing_early_stops_the_generation(tiny_engine: Engine, monkeypatch) -> None:
    word = tiny_engine.tokenizer.encode("a", allow_special=False)
    fed = feed_script(monkeypatch, [], then=word[0])  # never a stop token
    events = tiny_engine.generate(user("go"), params=SamplingParams(temperature=0.0, max_new_tokens=200))
    assert isinstance(next(events), AnswerDelta)
    events.close()  # no exception, nothing more: no Done, no further decode step
    assert next(events, None) is None and len(fed) <= 2
    _, done = run(tiny_engine, user("go"), params=SamplingParams(temperature=0.0, max_new_tokens=5))
    assert done.finish_reason == "length" and done.usage.completion_tokens == 5  # the engine is usable again


def test_context_overflow_names_each_input(tiny_engine: Engine, photos) -> None:
    with pytest.raises(InputError) as err:
        tiny_engine.generate(user(IMAGE, IMAGE, IMAGE, "hello"), photos, SamplingParams(), max_context=30)
    assert re.search(
        r"image 1 4, image 2 3, image 3 6.*--max-context is 30", error_line(err.value)
    )  # as the CLI says it


def test_image_count_must_match_placeholders(tiny_engine: Engine, photos) -> None:
    with pytest.raises(InputError, match="placeholders"):
        tiny_engine.generate(user(IMAGE, "two?"), photos[:2])
