"""The engine behind the `Describe` seam: timestamped keyframes in, the model's answer text out."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from kimivl_cli.video.scenes import TimedFrame

if TYPE_CHECKING:
    from kimivl_cli.engine.engine import Engine


def chat_messages(frames: Sequence[TimedFrame], prompt: str) -> list[dict[str, Any]]:
    """One user turn: each frame's `[00:01:23.4]` label right before its image, then the prompt."""
    content: list[dict[str, Any]] = []
    for frame in frames:
        content += [{"type": "text", "text": f"{frame.label}\n"}, {"type": "image"}]
    content.append({"type": "text", "text": prompt})
    return [{"role": "user", "content": content}]


@dataclass
class EngineDescribe:
    """A `Describe` that opens the engine on its first call, so `--shots-only` and early input
    errors never pay for loading weights. The reasoning trace is dropped: callers parse answers."""

    model: str
    device: str = "auto"
    quant: str = "none"
    max_tokens: int | None = None
    temperature: float | None = None
    thinking_budget: int | None = None
    _engine: Engine | None = field(default=None, init=False, repr=False)

    @property
    def engine(self) -> Engine:
        if self._engine is None:
            from kimivl_cli.tasks.backend import open_engine

            self._engine = open_engine(self.model, self.device, self.quant)
        return self._engine

    def __call__(self, frames: Sequence[TimedFrame], prompt: str) -> str:
        from kimivl_cli.engine.events import AnswerDelta

        engine = self.engine
        params = engine.defaults.with_overrides(
            max_new_tokens=self.max_tokens, temperature=self.temperature, thinking_budget=self.thinking_budget
        )
        events = engine.generate(chat_messages(frames, prompt), [f.image for f in frames], params, show_thinking=False)
        return "".join(event.text for event in events if isinstance(event, AnswerDelta))
