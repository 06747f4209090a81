"""Showing a generation: one renderer per output style, each consuming the engine's events.

- rich: a live view on a terminal. Reasoning streams in a dim "Thinking" panel that folds into
  one summary line when the answer starts (kept whole with show_thinking=True, never shown with
  False); the answer is rendered as Markdown. The live view shows the newest lines that fit;
  the full result is printed when the stream ends.
- plain: the text as it arrives, no escape codes; reasoning only on stderr and only if asked.
  Both text styles drop control characters the model may emit (ESC, CR, CSI...).
- json: one object at the end (`schema.ANSWER_SCHEMA`). jsonl: one event per line (`schema.EVENT_SCHEMA`).

Every renderer fills the caller's `Transcript` as events arrive (so chat keeps the partial
reply even after Ctrl-C) and, on Ctrl-C or an error mid-stream, first shows what had arrived,
then re-raises.
"""

from __future__ import annotations

import contextlib
import json
import signal
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, TextIO

from rich.console import Console, ConsoleOptions, Group, RenderableType, RenderResult
from rich.live import Live
from rich.markdown import Markdown
from rich.panel import Panel
from rich.segment import Segment
from rich.text import Text

from kimivl_cli.engine.events import AnswerDelta, Done, Event, ThinkingDelta, event_to_dict

# C0/C1 control characters except tab and newline: a model can emit ESC or CSI bytes, which
# would drive the user's terminal. Text modes drop them; JSON keeps them (escaped).
_CONTROLS = dict.fromkeys([*range(0x00, 0x09), *range(0x0B, 0x20), *range(0x7F, 0xA0)])


def printable(text: str) -> str:
    """`text` without control characters other than tab and newline."""
    return text.translate(_CONTROLS)


REFRESH_S = 1 / 12  # live view redraws at most this often (and at every phase change)
REDRAW_SHARE = 0.25  # ... and slows down so that redrawing takes at most this share of the time


@dataclass
class Transcript:
    """Everything a generation said: text so far and, once finished, its `Done` event."""

    thinking_parts: list[str] = field(default_factory=list)
    answer_parts: list[str] = field(default_factory=list)
    done: Done | None = None
    model: str = ""  # named in the 'interrupted' Done when the stream stops before its own
    notes: list[str] = field(default_factory=list)  # what was capped, skipped or ignored (--json's "notes")
    inputs: dict[str, list[str]] | None = None  # {"sent": [...], "skipped": [...]} of `ask`

    @property
    def thinking(self) -> str:
        return "".join(self.thinking_parts)

    @property
    def answer(self) -> str:
        return "".join(self.answer_parts)

    def add(self, event: Event) -> None:
        if isinstance(event, ThinkingDelta):
            self.thinking_parts.append(event.text)
        elif isinstance(event, AnswerDelta):
            self.answer_parts.append(event.text)
        else:
            self.done = event

    def final(self) -> Done:
        """The `Done` event, or an 'interrupted' one when the stream stopped early."""
        return self.done or Done(finish_reason="interrupted", model=self.model)

    def to_json(self) -> dict[str, Any]:
        done = self.final().to_dict()
        return {
            "answer": self.answer,
            "thinking": self.thinking,
            "finish_reason": done["finish_reason"],
            "model": done["model"],
            "usage": done["usage"],
            "timings": done["timings"],
            "notes": self.notes,
            **({"inputs": self.inputs} if self.inputs is not None else {}),
        }


# --- machine-readable ------------------------------------------------------------------------------


def render_json(events: Iterable[Event], transcript: Transcript, out: TextIO) -> None:
    """One JSON object when the stream ends (also when interrupted, then with finish_reason 'interrupted')."""
    try:
        for event in events:
            transcript.add(event)
    finally:
        out.write(json.dumps(transcript.to_json(), ensure_ascii=False) + "\n")
        out.flush()


def render_jsonl(events: Iterable[Event], transcript: Transcript, out: TextIO) -> None:
    """One JSON line per event as it arrives; a stream cut short still ends with a 'done' line."""

    def write(event: Event) -> None:
        out.write(json.dumps(event_to_dict(event), ensure_ascii=False) + "\n")
        out.flush()

    try:
        for event in events:
            transcript.add(event)
            write(event)
    finally:
        if transcript.done is None:
            write(transcript.final())


# --- plain text ---------------------------------------------------------------------------------------


def render_plain(
    events: Iterable[Event], transcript: Transcript, out: TextIO, err: TextIO, show_thinking: bool
) -> None:
    """Answer text to `out` as it arrives; reasoning to `err` only when `show_thinking`."""
    try:
        for event in events:
            transcript.add(event)
            if isinstance(event, ThinkingDelta) and show_thinking:
                err.write(printable(event.text))
                err.flush()
            elif isinstance(event, AnswerDelta):
                if show_thinking and transcript.thinking_parts and len(transcript.answer_parts) == 1:
                    err.write("\n\n")  # the reasoning is over
                    err.flush()
                out.write(printable(event.text))
                out.flush()
    finally:
        if show_thinking and transcript.thinking_parts and not transcript.answer_parts:
            err.write("\n")
            err.flush()
        if transcript.answer_parts:
            out.write("\n")
            out.flush()


# --- terminal -----------------------------------------------------------------------------------------


class _Tail:
    """The last lines of a renderable that fit on screen, so a live view follows the newest text."""

    def __init__(self, renderable: RenderableType) -> None:
        self.renderable = renderable

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        lines = console.render_lines(self.renderable, options.update(height=None), pad=False)
        for line in lines[-max(1, console.height - 1) :]:
            yield from line
            yield Segment.line()


@dataclass
class _ThinkingClock:
    """When the reasoning started and stopped, as the viewer saw it (the engine's figure wins when known)."""

    clock: Callable[[], float]
    started: float | None = None
    stopped: float | None = None

    def seconds(self, done: Done | None) -> float:
        if done is not None and done.timings.thinking_s > 0:
            return done.timings.thinking_s
        if self.started is None:
            return 0.0
        return (self.stopped if self.stopped is not None else self.clock()) - self.started


class RichView:
    """What the terminal shows for a transcript: live (newest lines) and final (everything).

    Live frames hold only the last `tail_chars` of the reasoning, so a long trace costs the
    same to redraw at its end as at its start.
    """

    def __init__(
        self, transcript: Transcript, show_thinking: bool | None, clock: Callable[[], float], tail_chars: int
    ) -> None:
        self.transcript = transcript
        self.show_thinking = show_thinking
        self.timer = _ThinkingClock(clock)
        self.tail_chars = tail_chars

    def observe(self, event: Event) -> bool:
        """Note timing; True when the event changes what kind of thing is on screen."""
        first_thinking = isinstance(event, ThinkingDelta) and self.timer.started is None
        first_answer = isinstance(event, AnswerDelta) and len(self.transcript.answer_parts) == 1
        if first_thinking:
            self.timer.started = self.timer.clock()
        if first_answer and self.timer.started is not None:
            self.timer.stopped = self.timer.clock()
        return first_thinking or first_answer or isinstance(event, Done)

    def summary(self) -> Text:
        done = self.transcript.done
        tokens = done.usage.thinking_tokens if done else len(self.transcript.thinking_parts)
        verb = "Thinking" if self.timer.stopped is None and done is None else "Thought"
        return Text(f"{verb} for {self.timer.seconds(done):.1f}s · {tokens} tokens", style="dim")

    def _thinking_block(self, final: bool) -> RenderableType | None:
        t = self.transcript
        if not t.thinking_parts:
            return None
        if self.show_thinking is False or (self.show_thinking is None and t.answer_parts):
            return self.summary()
        text = t.thinking if final else _last_chars(t.thinking_parts, self.tail_chars)
        return Panel(Text(printable(text), style="dim"), title="Thinking", title_align="left", border_style="dim")

    def renderable(self, final: bool = False) -> RenderableType:
        parts = [self._thinking_block(final)]
        if self.transcript.answer_parts:
            parts.append(Markdown(printable(self.transcript.answer)))
        group = Group(*(p for p in parts if p is not None))
        return group if final else _Tail(group)


def _last_chars(parts: list[str], n: int) -> str:
    """The last n characters of "".join(parts), joining only the parts needed."""
    tail: list[str] = []
    size = 0
    for part in reversed(parts):
        tail.append(part)
        size += len(part)
        if size >= n:
            break
    return "".join(reversed(tail))[-n:]


@contextlib.contextmanager
def _interrupt_after() -> Iterator[None]:
    """Hold a Ctrl-C that arrives inside the block until it ends, so a redraw is never left half
    written (the live frame's size would no longer match the screen). Main thread only."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught: list[int] = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: caught.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if caught:
        raise KeyboardInterrupt


def render_rich(
    events: Iterable[Event],
    transcript: Transcript,
    console: Console,
    show_thinking: bool | None = None,
    clock: Callable[[], float] = time.monotonic,
) -> None:
    """Live view while streaming, then the full result in its place (also after Ctrl-C or an error).

    The live display itself draws the full result when it stops (Rich lets it overflow the
    screen then), so the text is written once: erasing the live frame and printing the result
    anew showed it twice whenever the erase missed lines.
    """
    view = RichView(transcript, show_thinking, clock, tail_chars=console.width * console.height)
    live = Live(console=console, auto_refresh=False, transient=False, redirect_stdout=False, redirect_stderr=False)
    last_draw, interval = -REFRESH_S, REFRESH_S
    live.start()
    try:
        for event in events:
            transcript.add(event)
            changed = view.observe(event)
            now = clock()
            if changed or now - last_draw >= interval:
                started = time.perf_counter()
                with _interrupt_after():
                    live.update(view.renderable(), refresh=True)
                interval = max(REFRESH_S, (time.perf_counter() - started) / REDRAW_SHARE)
                last_draw = now
    finally:
        live.update(view.renderable(final=True))
        live.stop()
