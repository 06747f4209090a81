"""Where generations come from: the local engine or an OpenAI-compatible server (vLLM, SGLang, `kimivl serve`).

Both speak one interface, `ChatBackend.chat(messages, images, options) -> Iterator[Event]`, with
the engine's events (`engine.events`): messages in the `processor.chat` format (one
`{"type": "image"}` item per entry of `images`, in order), PIL images, thinking already split
out. Tasks take a backend (or a callable built from one with `collect`) and never care which.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from kimivl_cli.engine.events import AnswerDelta, Done, Event, ThinkingDelta

if TYPE_CHECKING:
    from PIL import Image

    from kimivl_cli.processor.chat import Message


@dataclass(frozen=True)
class ChatOptions:
    """Per-request settings; None leaves the backend's own default (the checkpoint's, or the server's)."""

    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    seed: int | None = None
    thinking_budget: int | None = None
    show_thinking: bool = True


class ChatBackend(Protocol):
    @property
    def name(self) -> str: ...

    def chat(
        self, messages: Sequence[Message], images: Sequence[Image.Image], options: ChatOptions = ...
    ) -> Iterator[Event]: ...


@dataclass(frozen=True)
class Completion:
    """A whole generation: what a non-streaming caller (ocr, video-scenes) needs."""

    thinking: str
    answer: str
    done: Done


def collect(events: Iterable[Event]) -> Completion:
    """Drain an event stream into one `Completion` (the last event must be `Done`)."""
    thinking: list[str] = []
    answer: list[str] = []
    done = None
    for event in events:
        if isinstance(event, ThinkingDelta):
            thinking.append(event.text)
        elif isinstance(event, AnswerDelta):
            answer.append(event.text)
        elif isinstance(event, Done):
            done = event
    if done is None:
        raise ValueError("the event stream ended without a Done event")
    return Completion("".join(thinking), "".join(answer), done)
