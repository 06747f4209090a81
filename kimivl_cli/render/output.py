"""Where a command writes, decided once from its flags and the terminal.

stdout carries the result only (answer, JSON, Markdown), so pipes get clean data; notes and
progress go to stderr. Colour and live views need a terminal on that stream and no `NO_COLOR`
(https://no-color.org); anything else gets plain text without escape codes.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Literal

from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    Task,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)
from rich.text import Text

from kimivl_cli.engine.events import Done, Event
from kimivl_cli.errors import InputError, name_fields
from kimivl_cli.render.answer import Transcript, render_json, render_jsonl, render_plain, render_rich

Style = Literal["rich", "plain", "json", "jsonl"]


def _fancy(console: Console) -> bool:
    return console.is_terminal and not console.no_color and not console.is_dumb_terminal


class _Rate(ProgressColumn):
    """Items per second, e.g. `2.4 pages/s` (blank until Rich has a speed estimate)."""

    def __init__(self, unit: str) -> None:
        super().__init__()
        self.unit = unit

    def render(self, task: Task) -> Text:
        speed = task.finished_speed or task.speed
        return Text("" if speed is None else f"{speed:.1f} {self.unit}/s", style="progress.data.speed")


_STDERR: Console | None = None


def stderr_console() -> Console:
    """The one Console on stderr every `Output` shares, so progress bars shown at once (loading
    the model while a page bar runs) nest in one live display instead of overwriting each other."""
    global _STDERR
    if _STDERR is None:
        _STDERR = Console(stderr=True, highlight=False)
    return _STDERR


@dataclass
class Output:
    """A command's output channels and the user's display choices (JSON, JSON lines, quiet, ...).

    `name_field` shows an option a note names as `field` (the CLI: as its flag)."""

    stdout: Console = field(default_factory=lambda: Console(highlight=False))
    stderr: Console = field(default_factory=stderr_console)
    json: bool = False
    jsonl: bool = False
    show_thinking: bool | None = None  # None: fold the reasoning on a terminal, omit it elsewhere
    quiet: bool = False
    clock: Callable[[], float] = time.monotonic
    notes: list[str] = field(default_factory=list)  # every note given, shown or not (the JSON output reports them)
    name_field: Callable[[str], str] = lambda field: f"`{field}`"

    def __post_init__(self) -> None:
        if self.json and self.jsonl:
            raise InputError("`json` and `jsonl` cannot be combined", "pick one")

    @property
    def style(self) -> Style:
        if self.jsonl:
            return "jsonl"
        if self.json:
            return "json"
        return "rich" if _fancy(self.stdout) else "plain"

    def stream(self, events: Iterable[Event], transcript: Transcript | None = None) -> Transcript:
        """Show a generation in this output's style and return what was said.

        Pass your own `transcript` to keep the partial reply when Ctrl-C (re-raised after
        showing what arrived) or an error cuts the stream.
        """
        transcript = Transcript() if transcript is None else transcript
        style = self.style
        if style == "json":
            render_json(events, transcript, self.stdout.file)
        elif style == "jsonl":
            render_jsonl(events, transcript, self.stdout.file)
        elif style == "rich":
            render_rich(events, transcript, self.stdout, self.show_thinking, self.clock)
        else:
            render_plain(events, transcript, self.stdout.file, self.stderr.file, bool(self.show_thinking))
        if style in ("rich", "plain"):
            self._warn_if_cut(transcript.done)
        return transcript

    def note(self, message: str) -> None:
        """One line for the user on stderr (unless quiet); never parsed as markup. Kept in `notes`."""
        message = name_fields(message, self.name_field)
        if message:
            self.notes.append(message.removeprefix("note: "))
        if not self.quiet:
            style = "dim" if _fancy(self.stderr) else None
            self.stderr.print(message, markup=False, highlight=False, soft_wrap=True, style=style)

    @property
    def wants_thinking(self) -> bool:
        """Whether the generation should stream the reasoning: when it is shown, and on a terminal
        always (hidden, it is a live "Thinking for 12.3s" status instead of silence)."""
        return self.show_thinking is not False or self.style == "rich"

    @contextmanager
    def progress(self, total: int | None, unit: str = "pages", description: str = "") -> Iterator[Callable[..., None]]:
        """A progress bar on stderr yielding `advance(n=1)`: count, rate and ETA (bytes, speed and ETA
        for unit "bytes"; elapsed time for total None); silent off a terminal or when quiet."""
        if self.quiet or not _fancy(self.stderr):
            yield lambda n=1: None
            return
        if unit == "bytes":
            counts: tuple[ProgressColumn, ...] = (DownloadColumn(), TransferSpeedColumn())
        else:
            counts = (MofNCompleteColumn(), TextColumn(unit), _Rate(unit))
        clock = TimeElapsedColumn() if total is None else TimeRemainingColumn()
        columns = (TextColumn("{task.description}"), BarColumn(), *counts, clock)
        with Progress(*columns, console=self.stderr, transient=True) as bar:
            task = bar.add_task(description, total=total)
            yield lambda n=1: bar.advance(task, n)

    def _warn_if_cut(self, done: Done | None) -> None:
        if done is not None and done.finish_reason == "length":
            tokens = done.usage.completion_tokens
            self.note(f"note: the answer was cut at {tokens} new tokens (raise `max_tokens` for more)")
