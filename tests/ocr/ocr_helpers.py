"""The real `kimivl` CLI in a subprocess, and the fake model the OCR tests put behind its seam."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

from kimivl_cli.backends import ServerSide

FAKE_CLI = Path(__file__).with_name("fake_cli.py")
ROOT = Path(__file__).resolve().parents[2]


def fake_generate(messages: list[dict], images: list) -> str:
    """A fenced transcription naming the image size (so post-processing runs), after `FAKE_OCR_DELAY` s."""
    time.sleep(float(os.environ.get("FAKE_OCR_DELAY", "0")))
    anchored = "ANCHORS:" in messages[0]["content"][-1]["text"]
    return f"Here is the markdown:\n```markdown\n# Fake page {images[0].size}\nanchored={anchored}\n```"


class FakeBackend(ServerSide):
    """A `ChatBackend` whose answer is `generate(messages, images)` (a str or a `Generation`):
    what the OCR tests put where the CLI opens its backend."""

    name = "fake"

    def __init__(self, generate) -> None:
        self.generate = generate

    def chat(self, messages, images, options=None):
        from kimivl_cli.backends import Generation
        from kimivl_cli.engine.events import AnswerDelta, Done, Usage

        reply = self.generate(messages, images)
        reply = reply if isinstance(reply, Generation) else Generation(reply)
        yield AnswerDelta(reply.text)
        usage = Usage(prompt_tokens=reply.prompt_tokens, answer_tokens=reply.completion_tokens)
        yield Done(finish_reason=reply.finish_reason, usage=usage)


def use_fake_model(generate, setattr=setattr) -> None:
    """Make every backend the CLI opens a `FakeBackend` over `generate` (`setattr`: e.g. monkeypatch's)."""
    from kimivl_cli.tasks import backend

    setattr(backend, "open_backend", lambda *args, **kwargs: FakeBackend(generate))


def kimivl_command(*args: str, fake_model: bool = False) -> list[str]:
    prefix = [sys.executable, str(FAKE_CLI)] if fake_model else [sys.executable, "-m", "kimivl_cli"]
    return [*prefix, *map(str, args)]
