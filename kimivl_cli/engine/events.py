"""What a generation streams out: the contract between the engine and `render`/`tasks`.

A generation is an iterator of events: zero or more `ThinkingDelta` (the reasoning
trace between `◁think▷` and `◁/think▷`), zero or more `AnswerDelta`, then exactly
one `Done` with token counts and timings. Text deltas are always whole UTF-8
characters (partial multi-byte sequences are held back until complete).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Literal, Union


@dataclass(frozen=True)
class ThinkingDelta:
    text: str
    kind: Literal["thinking"] = "thinking"


@dataclass(frozen=True)
class AnswerDelta:
    text: str
    kind: Literal["answer"] = "answer"


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int = 0
    image_tokens: int = 0
    thinking_tokens: int = 0
    answer_tokens: int = 0

    @property
    def completion_tokens(self) -> int:
        return self.thinking_tokens + self.answer_tokens


@dataclass(frozen=True)
class Timings:
    """Seconds; tokens/s derived by the renderer."""

    vision_s: float = 0.0
    prefill_s: float = 0.0
    decode_s: float = 0.0
    thinking_s: float = 0.0


@dataclass(frozen=True)
class Done:
    """The end of a generation. `finish_reason`: 'stop' (end token), 'length' (max tokens), 'interrupted'."""

    finish_reason: Literal["stop", "length", "interrupted"] = "stop"
    usage: Usage = field(default_factory=Usage)
    timings: Timings = field(default_factory=Timings)
    model: str = ""
    kind: Literal["done"] = "done"

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["usage"]["completion_tokens"] = self.usage.completion_tokens
        return d


Event = Union[ThinkingDelta, AnswerDelta, Done]


@dataclass(frozen=True)
class JsonFormat:
    """What a request's answer must be: JSON valid against `schema`, or any JSON object (None).

    The local engine enforces it while sampling (`engine.grammar`); a server gets it as OpenAI's
    `response_format`."""

    schema: dict[str, Any] | None = None


def event_to_dict(event: Event) -> dict[str, Any]:
    """JSON-ready form of an event (used by `--jsonl` and the server)."""
    if isinstance(event, Done):
        return event.to_dict()
    return {"kind": event.kind, "text": event.text}
