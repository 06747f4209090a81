"""A model behind the `Describe` seam: timestamped keyframes in, the model's answer text out."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from kimivl_cli.engine.events import JsonFormat
from kimivl_cli.tasks.video_scenes.scenes import Describe, TimedFrame

if TYPE_CHECKING:
    from PIL import Image

    from kimivl_cli.backends import Generation


def chat_messages(frames: Sequence[TimedFrame], prompt: str) -> list[dict[str, Any]]:
    """One user turn: each frame's `[00:01:23.4]` label right before its image, then the prompt."""
    content: list[dict[str, Any]] = []
    for frame in frames:
        content += [{"type": "text", "text": f"{frame.label}\n"}, {"type": "image"}]
    content.append({"type": "text", "text": prompt})
    return [{"role": "user", "content": content}]


def describe_with(
    answer: Callable[[list[dict[str, Any]], list[Image.Image], JsonFormat | None], Generation],
) -> Describe:
    """A `Describe` over `answer` (a `backends.AnswerOnly`: local engine or server, reasoning dropped).

    A lazily opened local engine loads on the first call, so `--shots-only` and early input
    errors never pay for the weights.
    """

    def describe(frames: Sequence[TimedFrame], prompt: str, json_format: JsonFormat | None = None) -> str:
        return answer(chat_messages(frames, prompt), [frame.image for frame in frames], json_format).text

    return describe
