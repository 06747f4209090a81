"""The local engine behind the `ChatBackend` interface."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING

from kimivl_cli.backends import ChatOptions
from kimivl_cli.engine.events import Event

if TYPE_CHECKING:
    from PIL import Image

    from kimivl_cli.engine.engine import Engine
    from kimivl_cli.processor.chat import Message


class LocalBackend:
    """An `Engine` in this process: options become `SamplingParams` overrides of the checkpoint defaults."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    @property
    def name(self) -> str:
        return self.engine.name

    def chat(
        self, messages: Sequence[Message], images: Sequence[Image.Image], options: ChatOptions = ChatOptions()
    ) -> Iterator[Event]:
        params = self.engine.defaults.with_overrides(
            max_new_tokens=options.max_tokens,
            temperature=options.temperature,
            top_p=options.top_p,
            seed=options.seed,
            thinking_budget=options.thinking_budget,
        )
        return self.engine.generate(messages, images, params, show_thinking=options.show_thinking)
