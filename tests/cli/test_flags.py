"""Errors below the CLI name option fields; the CLI shows each as the flag that exists for it."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

from kimivl_cli.cli.flags import error_line, flag_table, with_flags
from kimivl_cli.errors import FIELD, InputError

PACKAGE = Path(__file__).resolve().parents[2] / "kimivl_cli"


def _message_texts(tree: ast.AST) -> list[str]:
    """String parts of the arguments of every `...Error(...)`, `...Failure(...)`, `.append(...)`, `.note(...)` call."""
    texts = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        func = node.func
        name = func.id if isinstance(func, ast.Name) else func.attr if isinstance(func, ast.Attribute) else ""
        if name.endswith(("Error", "Failure")) or name in ("append", "note"):
            for arg in node.args:
                texts += [c.value for c in ast.walk(arg) if isinstance(c, ast.Constant) and isinstance(c.value, str)]
    return texts


def test_every_field_a_message_names_is_a_flag() -> None:
    flags = flag_table()
    unknown = {}
    for path in PACKAGE.rglob("*.py"):
        for text in _message_texts(ast.parse(path.read_text(encoding="utf-8"))):
            for field in FIELD.findall(text):
                if field not in flags:
                    unknown[field] = str(path.relative_to(PACKAGE))
    assert not unknown, f"fields named in messages that no command has as an option: {unknown}"


def test_the_cli_shows_fields_as_flags_and_others_as_written() -> None:
    exc = InputError("`frames` and `fps` both choose the frames", "drop `no_such_field`")
    assert error_line(exc) == "error: `frames` and `fps` both choose the frames (drop `no_such_field`)".replace(
        "`frames`", "--frames"
    ).replace("`fps`", "--fps")
    assert exc.one_line() == "`frames` and `fps` both choose the frames (drop `no_such_field`)"
    assert with_flags("`fmt` srt holds one video") == "--format srt holds one video"


def test_a_lower_layer_error_reaches_the_user_with_its_flag() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "kimivl_cli", "ask", "--backend", "openai", "hi"],
        capture_output=True,
        text=True,
        timeout=120,
        env={k: v for k, v in os.environ.items() if k != "KIMIVL_API_BASE"},
    )
    assert result.returncode == 2
    assert result.stderr.strip() == (
        "error: --backend openai needs the server's address (add --api-base http://HOST:8000/v1, or set KIMIVL_API_BASE)"
    )
