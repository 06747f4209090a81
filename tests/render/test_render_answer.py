"""Rendering generations: the terminal view and its folding, clean pipes, and the JSON contracts."""

from __future__ import annotations

import io
import json
import re

import jsonschema
import pyte
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from rich.console import Console

from kimivl_cli.engine.events import AnswerDelta, Done, Event, ThinkingDelta, Usage
from kimivl_cli.errors import InputError
from kimivl_cli.render import ANSWER_SCHEMA, EVENT_SCHEMA, Output, Transcript
from kimivl_cli.render.answer import RichView, printable, render_rich
from kimivl_cli.testing.events import event_from_dict
from tests.render.conftest import ticking

ESCAPE = re.compile(r"\x1b\[")
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]|\r")
ANSWER = jsonschema.Draft202012Validator(ANSWER_SCHEMA)
EVENT = jsonschema.Draft202012Validator(EVENT_SCHEMA)
SHOW_CURSOR = "\x1b[?25h"  # Rich's live view writes this when it stops; the final print follows


def texts(events: list[Event]) -> tuple[str, str]:
    thinking = "".join(e.text for e in events if isinstance(e, ThinkingDelta))
    return thinking, "".join(e.text for e in events if isinstance(e, AnswerDelta))


def final_screen(raw: str, width: int = 72, height: int = 24) -> str:
    """What stays on the terminal, scrollback included: `raw` played on an emulated terminal."""
    screen = pyte.HistoryScreen(width, height, history=100_000)
    pyte.Stream(screen).feed(raw.replace("\n", "\r\n"))  # a tty's output newline also returns the carriage
    scrolled = ["".join(char.data for char in line.values()) for line in screen.history.top]
    return "\n".join(line.rstrip() for line in [*scrolled, *screen.display]).strip("\n")


def flat(screen: str) -> str:
    """Screen text with panel borders and line wrapping removed."""
    return " ".join(re.sub("[│╭╮╰╯─]", " ", screen).split())


def interrupted_after(events: list[Event], n: int):
    yield from events[:n]
    raise KeyboardInterrupt


# --- terminal ---------------------------------------------------------------------------------------


def test_terminal_shows_thinking_panel_then_folds_it(streams, captured) -> None:
    cap = captured(terminal=True)
    transcript = cap.output.stream(streams["thinking"])
    raw = cap.out.getvalue()
    live, _, _ = raw.rpartition(SHOW_CURSOR)
    assert "Thinking" in ANSI.sub("", live)
    assert "╭─" in live and "bar chart" in ANSI.sub("", live)  # the reasoning streamed inside a panel
    final = final_screen(raw)
    assert re.search(r"Thought for 1\.5s · \d+ tokens", final)
    assert "bar chart" not in final and "╭─" not in final  # folded to one line
    assert "Q3 grew the most" in final  # Markdown: ** ** became bold
    assert "**" not in final
    assert "📈" in final and "百万" in final
    assert transcript.answer == texts(streams["thinking"])[1]
    assert cap.err.getvalue() == ""


def test_terminal_show_thinking_keeps_the_panel(streams, captured) -> None:
    cap = captured(terminal=True, show_thinking=True)
    cap.output.stream(streams["thinking"])
    final = final_screen(cap.out.getvalue())
    assert "Thinking" in final and "bar chart" in final and "╭─" in final
    assert "Thought for" not in final
    assert "Q3 grew the most" in final


def test_terminal_hide_thinking_never_shows_the_trace(streams, captured) -> None:
    cap = captured(terminal=True, show_thinking=False)
    cap.output.stream(streams["thinking"])
    screen = ANSI.sub("", cap.out.getvalue())
    assert "bar chart" not in screen
    assert "Thinking for" in screen  # a status line while reasoning
    assert "Thought for" in final_screen(cap.out.getvalue())


def test_terminal_thinking_without_answer_stays_visible(streams, captured) -> None:
    cap = captured(terminal=True)
    cap.output.stream(streams["no_answer"])
    final = final_screen(cap.out.getvalue())
    assert "Thinking" in final and "error codes and" in flat(final)
    assert "cut at" in cap.err.getvalue()  # finish_reason 'length' is explained on stderr


def test_terminal_live_view_follows_the_newest_lines(captured) -> None:
    lines = [f"line {i}" for i in range(60)]
    events = [AnswerDelta(line + "\n\n") for line in lines] + [Done()]
    cap = captured(terminal=True, height=12)
    cap.output.stream(events)
    frames = cap.out.getvalue().rpartition(SHOW_CURSOR)[0].split("\x1b[2K\x1b[1A")  # erase-up between frames
    assert max(frame.count("\n") for frame in frames[:-1]) < 12  # the last frame is the whole answer
    final = final_screen(cap.out.getvalue(), height=12).splitlines()
    assert [line for line in final if line] == lines  # the whole answer at the end, each line once


@pytest.mark.parametrize("n", [1, 3, 40])
def test_terminal_ctrl_c_prints_what_arrived_then_reraises(streams, captured, n) -> None:
    events = streams["thinking"]
    cap = captured(terminal=True, show_thinking=True)
    transcript = Transcript()
    with pytest.raises(KeyboardInterrupt):
        cap.output.stream(interrupted_after(events, n), transcript)
    thinking, answer = texts(events[:n])
    assert (transcript.thinking, transcript.answer) == (thinking, answer)  # the caller keeps the partial reply
    assert transcript.final().finish_reason == "interrupted"
    screen = final_screen(cap.out.getvalue())
    final = flat(screen)
    assert flat(thinking) in final
    assert all(word.strip("*") in final for word in answer.split())
    assert screen.count("╭─") == 1 and screen.count(" Thinking ") == 1  # shown once, not twice


def test_render_rich_uses_its_clock_when_the_engine_gives_no_time() -> None:
    ticks = iter(range(100))
    cap = Console(file=io.StringIO(), force_terminal=True, width=60)
    events = [ThinkingDelta("a"), ThinkingDelta("b"), AnswerDelta("c"), Done(usage=Usage(thinking_tokens=9))]
    render_rich(events, Transcript(), cap, clock=lambda: float(next(ticks)))
    assert "Thought for 3.0s · 9 tokens" in final_screen(cap.file.getvalue(), width=60, height=25)


# --- pipes and NO_COLOR -----------------------------------------------------------------------------


@pytest.mark.parametrize("show_thinking", [None, True, False])
def test_piped_output_has_no_escape_codes(captured, stream, show_thinking) -> None:
    name, events = stream
    cap = captured(terminal=False, show_thinking=show_thinking)
    assert cap.output.style == "plain"
    cap.output.stream(events)
    out, err = cap.out.getvalue(), cap.err.getvalue()
    assert not ESCAPE.search(out) and not ESCAPE.search(err)
    thinking, answer = texts(events)
    assert out == (answer + "\n" if answer else "")
    shown_thinking = thinking + "\n" if show_thinking and thinking else ""
    cut_note = "note: the answer was cut at" if name == "no_answer" else ""
    assert err.startswith(shown_thinking)
    assert err[len(shown_thinking) :].lstrip("\n").startswith(cut_note)
    assert bool(err) == bool(shown_thinking or cut_note)


def test_no_color_means_plain_even_on_a_terminal(streams, captured, monkeypatch) -> None:
    monkeypatch.setenv("NO_COLOR", "1")
    cap = captured(terminal=True)
    assert cap.output.style == "plain"
    cap.output.stream(streams["thinking"])
    assert not ESCAPE.search(cap.out.getvalue())
    assert cap.out.getvalue() == texts(streams["thinking"])[1] + "\n"


def test_plain_ctrl_c_ends_the_line_then_reraises(streams, captured) -> None:
    events = streams["instruct"]
    cap = captured(terminal=False)
    with pytest.raises(KeyboardInterrupt):
        cap.output.stream(interrupted_after(events, 5))
    assert cap.out.getvalue() == texts(events[:5])[1] + "\n"


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.booleans(), st.text(min_size=1, max_size=8)), max_size=12))
def test_plain_answer_is_exactly_the_answer_text(deltas) -> None:
    events: list[Event] = [ThinkingDelta(t) if is_thinking else AnswerDelta(t) for is_thinking, t in deltas]
    out, err = io.StringIO(), io.StringIO()
    output = Output(stdout=Console(file=out), stderr=Console(file=err), show_thinking=True)
    output.stream([*events, Done()])
    thinking, answer = texts(events)
    assert out.getvalue() == (printable(answer) + "\n" if answer else "")
    assert err.getvalue().replace("\n", "") == printable(thinking).replace("\n", "")


# --- JSON ----------------------------------------------------------------------------------------


def test_json_object_validates_and_matches(captured, stream) -> None:
    _, events = stream
    cap = captured(terminal=True, json=True)  # --json wins even on a terminal
    transcript = cap.output.stream(events)
    lines = cap.out.getvalue().splitlines()
    assert len(lines) == 1
    obj = json.loads(lines[0])
    ANSWER.validate(obj)
    assert (obj["thinking"], obj["answer"]) == texts(events)
    assert obj["usage"] == events[-1].to_dict()["usage"]
    assert obj["model"] == events[-1].model
    assert transcript.to_json() == obj
    assert cap.err.getvalue() == ""


def test_json_after_ctrl_c_is_a_valid_interrupted_object(streams, captured) -> None:
    cap = captured(terminal=False, json=True)
    with pytest.raises(KeyboardInterrupt):
        cap.output.stream(interrupted_after(streams["thinking"], 10), Transcript(model="org/model"))
    obj = json.loads(cap.out.getvalue())
    ANSWER.validate(obj)
    assert obj["finish_reason"] == "interrupted" and obj["model"] == "org/model"


def test_jsonl_lines_parse_validate_and_round_trip(captured, stream) -> None:
    _, events = stream
    cap = captured(terminal=False, jsonl=True)
    cap.output.stream(iter(events))
    lines = cap.out.getvalue().splitlines()
    assert len(lines) == len(events)
    for line in lines:
        EVENT.validate(json.loads(line))
    assert [event_from_dict(json.loads(line)) for line in lines] == events


def test_jsonl_after_ctrl_c_ends_with_an_interrupted_done(streams, captured) -> None:
    cap = captured(terminal=False, jsonl=True)
    with pytest.raises(KeyboardInterrupt):
        cap.output.stream(interrupted_after(streams["instruct"], 4))
    lines = [json.loads(line) for line in cap.out.getvalue().splitlines()]
    assert len(lines) == 5
    assert lines[-1]["kind"] == "done" and lines[-1]["finish_reason"] == "interrupted"
    EVENT.validate(lines[-1])


def test_schemas_are_valid_and_strict() -> None:
    jsonschema.Draft202012Validator.check_schema(ANSWER_SCHEMA)
    jsonschema.Draft202012Validator.check_schema(EVENT_SCHEMA)
    good = {"answer": "", "thinking": "", "finish_reason": "stop", "model": "", **_zeros(), "notes": []}
    ANSWER.validate(good)
    for broken in (
        {**good, "finish_reason": "crashed"},
        {**good, "usage": {**good["usage"], "prompt_tokens": -1}},
        {k: v for k, v in good.items() if k != "answer"},
        {**good, "extra": 1},
    ):
        with pytest.raises(jsonschema.ValidationError):
            ANSWER.validate(broken)


def _zeros() -> dict:
    done = Done().to_dict()
    return {"usage": done["usage"], "timings": done["timings"]}


def test_json_and_jsonl_together_is_a_usage_error(captured) -> None:
    with pytest.raises(InputError, match="cannot be combined"):
        captured(terminal=False, json=True, jsonl=True)


def test_live_frame_of_a_long_trace_holds_only_its_tail() -> None:
    console = Console(file=io.StringIO(), force_terminal=True, width=60, height=10)
    transcript = Transcript(thinking_parts=[f"w{i} " for i in range(50_000)])
    view = RichView(transcript, None, clock=lambda: 0.0, tail_chars=console.width * console.height)
    lines = console.render_lines(view.renderable(), console.options, pad=False)
    screen = "".join(seg.text for line in lines for seg in line)
    assert len(lines) <= 10
    assert "w49999" in screen and "w0 " not in screen
    assert "w0 " in flat("".join(s.text for s in console.render(view.renderable(final=True))))


def test_notes_under_no_color_have_no_escape_codes(captured, monkeypatch) -> None:
    monkeypatch.setenv("NO_COLOR", "1")
    cap = captured(terminal=True)
    cap.output.note("using 12 of 36 pages")
    assert cap.err.getvalue() == "using 12 of 36 pages\n"


HOSTILE = [ThinkingDelta("see \x1b]0;title\x07here"), AnswerDelta("ok \x1b[31mred\x1b[0m\r\x9b2J\tdone\n"), Done()]


def test_control_characters_from_the_model_never_reach_the_terminal(captured) -> None:
    for terminal in (False, True):
        cap = captured(terminal=terminal, show_thinking=True)
        cap.output.stream(HOSTILE)
        for stream in (cap.out.getvalue(), cap.err.getvalue()):
            assert "\x1b[31m" not in stream and "\x9b" not in stream and "\x07" not in stream and "\x1b]" not in stream
        if not terminal:
            assert cap.out.getvalue() == "ok [31mred[0m2J\tdone\n\n"
    cap = captured(terminal=False, json=True)
    cap.output.stream(HOSTILE)
    assert json.loads(cap.out.getvalue())["answer"] == "ok \x1b[31mred\x1b[0m\r\x9b2J\tdone\n"  # data stays exact


@pytest.mark.parametrize("redraw", [2, 12])
def test_ctrl_c_in_the_middle_of_a_redraw_leaves_the_answer_once(monkeypatch, redraw: int) -> None:
    """SIGINT lands while a live frame is half rendered: the frame is finished first, then the
    whole partial answer stays on the (emulated) terminal exactly once."""
    import os
    import signal

    from rich.markdown import Markdown

    from kimivl_cli.render import answer

    drawn = [0]

    class Interrupting(Markdown):
        def __rich_console__(self, console, options):
            drawn[0] += 1
            for i, segment in enumerate(super().__rich_console__(console, options)):
                if drawn[0] == redraw and i == 0:
                    os.kill(os.getpid(), signal.SIGINT)
                yield segment

    monkeypatch.setattr(answer, "Markdown", Interrupting)
    lines = [f"line {i} " + "word " * 8 for i in range(40)]
    console = Console(file=io.StringIO(), force_terminal=True, width=72, height=12)
    transcript = Transcript()
    with pytest.raises(KeyboardInterrupt):
        render_rich(iter([AnswerDelta(line + "\n\n") for line in lines]), transcript, console, clock=ticking())
    shown = [line for line in final_screen(console.file.getvalue(), height=12).splitlines() if line]
    assert len(transcript.answer_parts) >= redraw - 1 and shown == [line.strip() for line in transcript.answer_parts]
