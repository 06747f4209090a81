"""`kimivl chat` through the real CLI on a generated tiny checkpoint: driven through its prompt on a
pseudo-terminal (pexpect), and fed lines through a pipe like a script would."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import jsonschema
import pexpect

from kimivl_cli.cli.chat import PROMPT

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "examples" / "chart.png"
ENV = {"PATH": "/usr/bin:/bin", "TERM": "xterm-256color", "OMP_NUM_THREADS": "1", "LANG": "C.UTF-8"}


def _spawn(checkpoint: Path) -> pexpect.spawn:
    args = ["-m", "kimivl_cli", "chat", "--model", str(checkpoint), "--max-tokens", "4", "--seed", "0"]
    return pexpect.spawn(
        sys.executable, args, encoding="utf-8", codec_errors="replace", timeout=300, env=ENV, dimensions=(40, 120)
    )


def _command(child: pexpect.spawn, line: str, reply: str | None = None) -> None:
    child.sendline(line)
    if reply is not None:
        child.expect_exact(reply)
    child.expect_exact(PROMPT)


def test_a_terminal_session(tiny_checkpoint: Path, tmp_path: Path) -> None:
    saved = tmp_path / "chat.json"
    child = _spawn(tiny_checkpoint)
    try:
        child.expect_exact("/help for commands")
        child.expect_exact(PROMPT)
        _command(child, "/help", "/pdf PATH [PAGES]")
        _command(child, "Hello, who are you?")
        _command(child, f"/image {CHART}", "attached")
        _command(child, "What does the chart show?")
        _command(child, f"/save {saved}", "saved 2 exchanges")
        _command(child, f"/save {saved}", "exists")
        _command(child, "/thinking on", "thinking shown")
        _command(child, "/nonsense", "error: unknown command /nonsense")
        _command(child, "/reset", "conversation cleared")
        child.sendline("/exit")
        child.expect(pexpect.EOF)
    finally:
        child.close(force=True)
    assert child.exitstatus == 0
    turns = json.loads(saved.read_text())["turns"]
    assert [t["role"] for t in turns] == ["user", "assistant"] * 2
    assert turns[0]["text"] == "Hello, who are you?" and turns[0]["images"] == 0
    assert turns[2]["images"] == 1 and turns[2]["attachments"] == [str(CHART)]


def test_ctrl_c_at_the_prompt_exits_130(tiny_checkpoint: Path) -> None:
    child = _spawn(tiny_checkpoint)
    try:
        child.expect_exact(PROMPT)
        # CPython's readline misses a SIGINT that lands between printing the prompt and waiting for
        # input (it blocks in select until a key): give it a moment, and press Ctrl-C again if so.
        time.sleep(0.5)
        child.sendintr()
        if child.expect([pexpect.EOF, pexpect.TIMEOUT], timeout=15) == 1:
            child.sendintr()
            child.expect(pexpect.EOF)
    finally:
        child.close(force=True)
    assert child.exitstatus == 130


def test_piped_lines_give_plain_answers_and_a_failed_step_sets_the_exit_code(
    tiny_checkpoint: Path, tmp_path: Path
) -> None:
    saved = tmp_path / "out.json"
    notes = ROOT / "examples" / "notes.pdf"
    script = f"/thinking off\nFirst question\n/image /nonexistent.png\n/pdf {notes} 1\nSecond?\n/save! {saved}\n"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "kimivl_cli",
            "chat",
            str(CHART),
            "--model",
            str(tiny_checkpoint),
            "--max-tokens",
            "3",
            "--seed",
            "0",
        ],
        input=script.encode(),
        capture_output=True,
        timeout=300,
        env={**ENV, "NO_COLOR": "1"},
    )
    stdout, stderr = result.stdout.decode(), result.stderr.decode()
    assert result.returncode == 2, stderr  # the conversation went on, but a script learns a step failed
    assert "error: /nonexistent.png: no such file or folder\n" in stderr
    assert "\x1b" not in stdout and "\x1b" not in stderr and PROMPT not in stdout
    turns = json.loads(saved.read_text())["turns"]
    assert [t["role"] for t in turns] == ["user", "assistant"] * 2
    assert [t["images"] for t in turns if t["role"] == "user"] == [1, 1]
    assert all(t["text"] in stdout for t in turns if t["role"] == "assistant")  # answers on stdout, as said


def _piped(checkpoint: Path, script: str, *flags: str) -> subprocess.CompletedProcess[str]:
    args = ["-m", "kimivl_cli", "chat", "--model", str(checkpoint), "--max-tokens", "3", "--seed", "0", *flags]
    result = subprocess.run(
        [sys.executable, *args], input=script.encode(), capture_output=True, timeout=300, env={**ENV, "NO_COLOR": "1"}
    )
    return subprocess.CompletedProcess(result.args, result.returncode, result.stdout.decode(), result.stderr.decode())


def test_piped_answers_are_separated_and_json_gives_one_object_each(tiny_checkpoint: Path) -> None:
    from kimivl_cli.render import ANSWER_SCHEMA, EVENT_SCHEMA

    plain = _piped(tiny_checkpoint, "First?\nSecond?\n")
    assert plain.returncode == 0, plain.stderr
    answers = plain.stdout.split("\n\n")
    assert len(answers) == 3 and answers[-1] == "" and all(a.strip() for a in answers[:2])  # a blank line after each
    objects = [json.loads(line) for line in _piped(tiny_checkpoint, "First?\nSecond?\n", "--json").stdout.splitlines()]
    assert len(objects) == 2
    for data in objects:
        jsonschema.validate(data, ANSWER_SCHEMA)
    events = [json.loads(line) for line in _piped(tiny_checkpoint, "First?\nSecond?\n", "--jsonl").stdout.splitlines()]
    for event in events:
        jsonschema.validate(event, EVENT_SCHEMA)
    assert [e["kind"] for e in events].count("done") == 2


def test_load_goes_on_from_a_saved_conversation(tiny_checkpoint: Path, tmp_path: Path) -> None:
    saved = tmp_path / "chat.json"
    first = _piped(tiny_checkpoint, f"/image {CHART}\nWhat is it?\n/save {saved}\n")
    assert first.returncode == 0, first.stderr
    later = tmp_path / "later.json"
    second = _piped(tiny_checkpoint, f"/load {saved}\nAnd then?\n/save {later}\n/load {tmp_path / 'none.json'}\n")
    assert "loaded 1 exchange from" in second.stderr and "its 1 image is not restored" in second.stderr
    assert second.returncode == 2 and "none.json: no such file" in second.stderr  # the failed step is reported
    turns = json.loads(later.read_text())["turns"]
    assert [t["text"] for t in turns if t["role"] == "user"] == ["What is it?", "And then?"]
    assert json.loads(saved.read_text())["turns"][1]["text"] == turns[1]["text"]  # the earlier answer carried over
