"""Output channels: style choice, notes and progress bars on stderr."""

from __future__ import annotations

import re

import pytest

from kimivl_cli.render import Output

ESCAPE = re.compile(r"\x1b\[")


@pytest.mark.parametrize(
    ("terminal", "flags", "style"),
    [
        (True, {}, "rich"),
        (False, {}, "plain"),
        (True, {"json": True}, "json"),
        (False, {"jsonl": True}, "jsonl"),
    ],
)
def test_style_follows_flags_and_terminal(captured, terminal, flags, style) -> None:
    assert captured(terminal=terminal, **flags).output.style == style


def test_dumb_terminal_is_plain(captured, monkeypatch) -> None:
    monkeypatch.setenv("TERM", "dumb")
    assert captured(terminal=True).output.style == "plain"


def test_default_output_uses_the_real_streams(capsys) -> None:
    Output().note("hello")
    assert capsys.readouterr().err == "hello\n"


def test_note_goes_to_stderr_literally_and_unwrapped(captured) -> None:
    cap = captured(terminal=False, width=40)
    message = "page 3 [bold]not markup[/bold] " + "x" * 100
    cap.output.note(message)
    assert cap.err.getvalue() == message + "\n"
    assert cap.out.getvalue() == ""


def test_quiet_silences_notes_and_progress(captured) -> None:
    cap = captured(terminal=True, quiet=True)
    cap.output.note("hidden")
    with cap.output.progress(3) as advance:
        for _ in range(3):
            advance()
    assert cap.err.getvalue() == "" and cap.out.getvalue() == ""


def test_progress_is_silent_off_a_terminal(captured) -> None:
    cap = captured(terminal=False)
    with cap.output.progress(5, description="OCR") as advance:
        advance(5)
    assert cap.err.getvalue() == ""


def test_progress_on_a_terminal_shows_count_rate_and_stays_off_stdout(captured) -> None:
    cap = captured(terminal=True, width=100)
    with cap.output.progress(4, unit="pages", description="OCR") as advance:
        for _ in range(4):
            advance()
    err = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", cap.err.getvalue())
    assert "OCR" in err and "4/4" in err and "pages" in err
    assert cap.out.getvalue() == ""


def test_note_on_a_terminal_is_only_dimmed(captured) -> None:
    cap = captured(terminal=True)
    cap.output.note("using 12 of 36 pages")
    assert re.sub(r"\x1b\[[0-9;]*m", "", cap.err.getvalue()) == "using 12 of 36 pages\n"
    assert ESCAPE.search(cap.err.getvalue())
