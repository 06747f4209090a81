"""Where generations come from: the local engine or an OpenAI-compatible server (vLLM, SGLang, `kimivl serve`).

Both speak one interface, `ChatBackend.chat(messages, images, options) -> Iterator[Event]`, with
the engine's events (`engine.events`): messages in the `processor.chat` format (one
`{"type": "image"}` item per entry of `images`, in order), PIL images, thinking already split
out. Each declares what it can do (as `llm` models declare `can_stream`): how its images are
sized, its tokenizer if prompts can be counted here, its context limit, its concurrency. Streaming tasks (ask, chat) take a backend; batch tasks (ocr, video-scenes) take an
`AnswerOnly` over one, and never care which.

In the one-way flow: above `engine` (whose events they yield) and `processor`, below `tasks`,
`serve` and `cli`.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Protocol

from kimivl_cli.engine.events import AnswerDelta, Done, Event, JsonFormat, ThinkingDelta

if TYPE_CHECKING:
    from PIL import Image

    from kimivl_cli.processor.chat import Message
    from kimivl_cli.processor.image import ImageProcessorConfig
    from kimivl_cli.processor.tokenizer import Tokenizer


@dataclass(frozen=True)
class ChatOptions:
    """Per-request settings; None leaves the backend's own default (the checkpoint's, or the server's)."""

    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    seed: int | None = None
    thinking_budget: int | None = None
    show_thinking: bool = True
    max_context: int | None = None  # prompt + reply tokens; the local engine only (a server has its own limit)
    json_format: JsonFormat | None = None  # the answer must be JSON (valid against a schema)
    stop: tuple[str, ...] = ()  # strings that end the answer (OpenAI's `stop`; not included)


@dataclass(frozen=True)
class ContextLimit:
    """The tokens a prompt and its reply may take together (`context`), and how many of them the
    reply may take under a request's options (`reply`)."""

    context: int
    reply: int


class ChatBackend(Protocol):
    @property
    def name(self) -> str: ...

    notes: list[str]
    """What the backend ignored or changed of what was asked (one line each), once it is open."""

    max_concurrency: int | None
    """Requests it runs at once; None: as many as are sent (a server queues its own)."""

    @property
    def image_config(self) -> ImageProcessorConfig:
        """How images are sized for its model."""
        ...

    @property
    def tokenizer(self) -> Tokenizer | None:
        """Counts prompt tokens here; None where the other side counts its own."""
        ...

    def context_limit(self, options: ChatOptions) -> ContextLimit | None:
        """Its model's context and the reply's share under `options`; None where the other side
        applies its own limit (so a `max_context` cannot be honoured)."""
        ...

    def option_notes(self, options: ChatOptions) -> list[str]:
        """What of `options` it may not honour, one line each (options named as `field`)."""
        ...

    def chat(
        self, messages: Sequence[Message], images: Sequence[Image.Image], options: ChatOptions = ...
    ) -> Iterator[Event]: ...


class ServerSide:
    """The capabilities of a backend whose server counts and limits on its side: images at the
    official processor's size, no tokenizer here, no context limit known here, no concurrency
    limit (the server queues)."""

    max_concurrency: int | None = None
    tokenizer: Tokenizer | None = None

    @property
    def image_config(self) -> ImageProcessorConfig:
        from kimivl_cli.processor.image import ImageProcessorConfig  # imports torch: not at CLI start

        return ImageProcessorConfig.official()

    def context_limit(self, options: ChatOptions) -> ContextLimit | None:
        return None

    def option_notes(self, options: ChatOptions) -> list[str]:
        return []


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


@dataclass(frozen=True)
class Generation:
    """A batch task's reply: the answer text, the request's token counts (0 when unknown) and why it
    ended ('length': cut at the token limit)."""

    text: str
    prompt_tokens: int = 0
    completion_tokens: int = 0
    finish_reason: str = "stop"


class AnswerOnly:
    """`(messages, images) -> Generation` over a backend: one whole completion, reasoning dropped.

    The one path from batch tasks to a model, local or remote. A Thinking model's reasoning
    still counts in `completion_tokens`. At most `limit` requests run at once however many
    threads call it (the others wait), so nested pools never exceed `--concurrency`.
    """

    def __init__(self, backend: ChatBackend, options: ChatOptions = ChatOptions(), limit: int = 1) -> None:
        self.backend = backend
        self.options = replace(options, show_thinking=False)
        self._slots = threading.BoundedSemaphore(limit)

    def __call__(
        self, messages: Sequence[Message], images: Sequence[Image.Image], json_format: JsonFormat | None = None
    ) -> Generation:
        """One answer; `json_format` makes it JSON (the local engine constrains its sampling to it)."""
        options = replace(self.options, json_format=json_format) if json_format is not None else self.options
        with self._slots:
            reply = collect(self.backend.chat(messages, images, options))
        usage = reply.done.usage
        return Generation(reply.answer, usage.prompt_tokens, usage.completion_tokens, reply.done.finish_reason)
