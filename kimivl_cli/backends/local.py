"""The local engine behind the `ChatBackend` interface."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING

from kimivl_cli.backends import ChatOptions, ContextLimit
from kimivl_cli.engine.events import Event

if TYPE_CHECKING:
    from PIL import Image

    from kimivl_cli.engine.engine import Engine
    from kimivl_cli.processor.chat import Message
    from kimivl_cli.processor.image import ImageProcessorConfig
    from kimivl_cli.processor.tokenizer import Tokenizer


class LocalBackend:
    """An `Engine` in this process: options become `SamplingParams` overrides of the checkpoint defaults.

    Give it an engine, or (`LocalBackend.lazy`) a function that opens one: then the weights load
    on first use, so runs that never reach the model (OCR from the text layer, a resume with
    everything done, early input errors) never pay for them. One engine runs one request at a
    time: batch commands run it with concurrency 1.
    """

    max_concurrency: int | None = 1  # one engine runs one request at a time

    def __init__(self, engine: Engine | None = None, *, opener: Callable[[], Engine] | None = None) -> None:
        if (engine is None) == (opener is None):
            raise TypeError("give an engine or an opener")
        self._engine = engine
        self._opener = opener
        self._lock = threading.Lock()

    @classmethod
    def lazy(cls, opener: Callable[[], Engine]) -> LocalBackend:
        return cls(opener=opener)

    @property
    def engine(self) -> Engine:
        with self._lock:
            if self._engine is None:
                self._engine = self._opener()
            return self._engine

    @property
    def name(self) -> str:
        return self.engine.name

    @property
    def notes(self) -> list[str]:
        """The engine's notes from loading (e.g. a quant mode it could not honour); [] before it loads."""
        return self._engine.notes if self._engine is not None else []

    @property
    def image_config(self) -> ImageProcessorConfig:
        return self.engine.image_config

    @property
    def tokenizer(self) -> Tokenizer | None:
        return self.engine.tokenizer

    def context_limit(self, options: ChatOptions) -> ContextLimit:
        """The model's context; the reply takes `options.max_tokens`, else the checkpoint's default."""
        engine = self.engine
        reply = engine.defaults.with_overrides(max_new_tokens=options.max_tokens).max_new_tokens
        return ContextLimit(engine.config.text.max_position_embeddings, reply)

    def option_notes(self, options: ChatOptions) -> list[str]:
        return []  # the engine honours every option

    def chat(
        self, messages: Sequence[Message], images: Sequence[Image.Image], options: ChatOptions = ChatOptions()
    ) -> Iterator[Event]:
        engine = self.engine
        params = engine.defaults.with_overrides(
            max_new_tokens=options.max_tokens,
            temperature=options.temperature,
            top_p=options.top_p,
            seed=options.seed,
            thinking_budget=options.thinking_budget,
        )
        return engine.generate(
            messages,
            images,
            params,
            show_thinking=options.show_thinking,
            max_context=options.max_context,
            json_format=options.json_format,
            stop=options.stop,
        )
