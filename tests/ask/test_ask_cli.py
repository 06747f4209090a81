"""`kimivl ask` through the real CLI on a generated tiny checkpoint (random weights: garbage text).

Checks what a user or a script relies on: exit codes, clean stdout in pipes, JSON that matches
the published schema, and notes on stderr. Each run costs a few seconds of startup, so each
test covers several inputs or checks at once.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest
from PIL import Image

from kimivl_cli.processor.image import image_token_count
from kimivl_cli.render import ANSWER_SCHEMA, EVENT_SCHEMA

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "examples" / "chart.png"
NOTES = ROOT / "examples" / "notes.pdf"


@pytest.fixture(scope="module")
def ask(tiny_checkpoint: Path):
    def run(*args: str, stdin: bytes | None = b"") -> subprocess.CompletedProcess[str]:
        command = [sys.executable, "-m", "kimivl_cli", "ask", *args, "--model", str(tiny_checkpoint)]
        env = {"PATH": "/usr/bin:/bin", "NO_COLOR": "", "TERM": "xterm", "OMP_NUM_THREADS": "1"}
        result = subprocess.run(command, input=stdin, capture_output=True, timeout=300, env=env)
        return subprocess.CompletedProcess(
            result.args, result.returncode, result.stdout.decode(), result.stderr.decode()
        )

    return run


def _page_size(pdf: Path) -> tuple[int, int]:
    from kimivl_cli.media.pdf import PdfDocument

    with PdfDocument(pdf) as doc:
        assert doc.page_count == 1
        return doc.render_size(0)


def _answer(result: subprocess.CompletedProcess[str]) -> dict:
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    jsonschema.validate(data, ANSWER_SCHEMA)
    return data


def test_image_json_matches_the_schema(ask) -> None:
    data = _answer(ask(str(CHART), "Which quarter grew most?", "--json", "--max-tokens", "6", "--seed", "1"))
    assert data["usage"]["image_tokens"] > 0 and 1 <= data["usage"]["completion_tokens"] <= 6
    assert data["finish_reason"] in ("stop", "length")


def test_pdf_page_range_streams_jsonl_events(ask, libtasn1_pdf: Path) -> None:
    result = ask(str(libtasn1_pdf), "--pages", "2-3", "Summarise", "--jsonl", "--max-tokens", "4")
    assert result.returncode == 0, result.stderr
    events = [json.loads(line) for line in result.stdout.splitlines()]
    for event in events:
        jsonschema.validate(event, EVENT_SCHEMA)
    done = events[-1]
    page = image_token_count(1224, 1584)  # a Letter page at 144 dpi, as `kimivl inspect` reports it
    assert done["kind"] == "done" and done["usage"]["image_tokens"] == 2 * page


def test_video_frames_and_plain_output_without_escape_codes(ask, bikes_mp4: Path) -> None:
    result = ask(str(bikes_mp4), "--frames", "4", "What happens?", "--max-tokens", "5", "--temperature", "0")
    assert result.returncode == 0, result.stderr
    assert "\x1b" not in result.stdout and "\x1b" not in result.stderr
    assert result.stdout.endswith("\n") and "cut at 5 new tokens (raise --max-tokens for more)" in result.stderr


def test_stdin_image_and_question_from_stdin(ask) -> None:
    piped = _answer(ask("-", "Transcribe", "--json", "--max-tokens", "3", stdin=CHART.read_bytes()))
    asked = _answer(ask(str(CHART), "--json", "--max-tokens", "3", stdin=b"Transcribe\n"))
    assert piped["usage"]["prompt_tokens"] == asked["usage"]["prompt_tokens"]  # same image, same question


def test_several_inputs_in_one_turn(ask, bikes_mp4: Path, tmp_path: Path) -> None:
    text = tmp_path / "context.md"
    text.write_text("# Notes\nThe chart is from 2024.\n")
    args = (str(CHART), str(NOTES), str(text), str(bikes_mp4), "--frames", "2", "Relate these", "--json")
    data = _answer(ask(*args, "--max-tokens", "3", "--system", "Answer in one word."))
    chart = image_token_count(*Image.open(CHART).size)
    notes_page = image_token_count(*_page_size(NOTES))
    frame = image_token_count(640, 272)
    assert data["usage"]["image_tokens"] == chart + notes_page + 2 * frame


def test_long_pdf_with_a_small_context_picks_pages_and_says_so(ask, libtasn1_pdf: Path) -> None:
    question = "What does asn1_der_decoding_element return?"
    result = ask(str(libtasn1_pdf), question, "--max-context", "2048", "--max-tokens", "4", "--json")
    data = _answer(result)
    assert "of 36 pages" in result.stderr and "BM25" in result.stderr and "--max-context 2,048" in result.stderr
    assert data["usage"]["prompt_tokens"] + data["usage"]["completion_tokens"] <= 2048


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--max-tokens", "2"], "no question"),
        (["missing.png", "What?"], "no such file"),
        ([str(CHART), "q", "--json", "--jsonl"], "cannot be combined"),
    ],
)
def test_bad_input_is_one_error_line_and_exit_2(ask, args: list[str], message: str) -> None:
    result = ask(*args)
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("error:") and message in result.stderr
    assert result.stdout == ""


def test_ctrl_c_flushes_what_was_streamed_and_exits_130(tiny_checkpoint: Path) -> None:
    import pexpect

    args = ["-m", "kimivl_cli", "ask", str(CHART), "Describe", "--model", str(tiny_checkpoint), "--jsonl"]
    child = pexpect.spawn(
        sys.executable,
        [*args, "--max-tokens", "20000", "--temperature", "0"],
        encoding="utf-8",
        codec_errors="replace",
        timeout=300,
    )
    try:
        child.expect_exact('{"kind": "answer"')  # generation is under way
        child.sendintr()
        child.expect(pexpect.EOF)
    finally:
        child.close(force=True)
    assert child.exitstatus == 130
    lines = child.before.replace("^C", "").strip().splitlines()  # the terminal echoes the Ctrl-C as ^C
    last = json.loads(lines[-1])
    jsonschema.validate(last, EVENT_SCHEMA)
    assert last["kind"] == "done" and last["finish_reason"] == "interrupted"
