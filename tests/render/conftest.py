"""Realistic event streams, made the way the engine makes them: reply text cut into token-sized
pieces, through the real thinking splitter, then a `Done`."""

from __future__ import annotations

import io
import random

import pytest
from rich.console import Console

from kimivl_cli.engine.events import Done, Event, Timings, Usage
from kimivl_cli.engine.stream import ThinkingSplitter
from kimivl_cli.render import Output

THINKING_REPLY = (
    "◁think▷The user shows a bar chart and asks which quarter grew most.\n"
    "Q1 → Q2: +12 %, Q2 → Q3: +31 %, Q3 → Q4: −4 %.\nSo Q3. Let me double-check the axis… 单位是百万。◁/think▷\n\n"
    "**Q3** grew the most (+31 %).\n\n| quarter | growth |\n|---|---|\n| Q2 | +12 % |\n| Q3 | +31 % |\n\n"
    "Units are millions (百万) 📈."
)
INSTRUCT_REPLY = "The image shows a red bicycle leaning against a wall.\n\n- colour: red\n- café sign: «Chez Zoé»"
EMPTY_THINKING_REPLY = "◁think▷◁/think▷Just the answer: `42`."
NO_ANSWER_REPLY = "◁think▷Reading page 3 of 36. The table on the left lists the error codes and"


def recorded(reply: str, finish_reason: str = "stop", seed: int = 0) -> list[Event]:
    rng = random.Random(seed)
    splitter = ThinkingSplitter()
    events: list[Event] = []
    tokens = 0
    i = 0
    while i < len(reply):
        n = rng.randint(1, 4)
        events += splitter.feed(reply[i : i + n])
        i += n
        tokens += 1
    events += splitter.flush()
    thinking_tokens = tokens // 2 if "◁think▷" in reply else 0
    usage = Usage(
        prompt_tokens=812, image_tokens=640, thinking_tokens=thinking_tokens, answer_tokens=tokens - thinking_tokens
    )
    timings = Timings(vision_s=0.31, prefill_s=0.52, decode_s=2.4, thinking_s=1.5 if thinking_tokens else 0.0)
    return [*events, Done(finish_reason, usage, timings, model="Kimi-VL-A3B-Thinking-2506")]


STREAMS = {
    "thinking": recorded(THINKING_REPLY),
    "instruct": recorded(INSTRUCT_REPLY),
    "empty_thinking": recorded(EMPTY_THINKING_REPLY),
    "no_answer": recorded(NO_ANSWER_REPLY, finish_reason="length"),
    "nothing": [Done(model="tiny")],
}


@pytest.fixture
def streams() -> dict[str, list[Event]]:
    return STREAMS


@pytest.fixture(params=sorted(STREAMS))
def stream(request) -> tuple[str, list[Event]]:
    return request.param, STREAMS[request.param]


def ticking(step: float = 0.1):
    """A fake clock that advances `step` seconds per reading: every event gets a live redraw."""
    now = [0.0]

    def clock() -> float:
        now[0] += step
        return now[0]

    return clock


class Captured:
    """An `Output` writing into strings instead of the real stdout/stderr."""

    def __init__(self, terminal: bool, width: int = 72, height: int = 24, **kwargs) -> None:
        self.out, self.err = io.StringIO(), io.StringIO()
        kwargs.setdefault("clock", ticking())
        self.output = Output(
            stdout=Console(file=self.out, force_terminal=terminal, width=width, height=height, highlight=False),
            stderr=Console(file=self.err, force_terminal=terminal, width=width, height=height, highlight=False),
            **kwargs,
        )


@pytest.fixture
def captured():
    return Captured
