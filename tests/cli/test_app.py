"""The CLI shell: version, help with examples, one-line errors with the right exit codes."""

from __future__ import annotations

import subprocess
import sys

from kimivl_cli import __version__


def kimivl(*args: str, stdin: bytes | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "kimivl_cli", *args],
        input=stdin.decode() if stdin is not None else None,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_version() -> None:
    result = kimivl("--version")
    assert result.returncode == 0
    assert result.stdout.strip() == f"kimivl {__version__}"


def test_help_lists_commands_with_examples() -> None:
    result = kimivl("--help")
    assert result.returncode == 0
    for command in ("ask", "ocr", "video-scenes", "inspect", "info"):
        assert command in result.stdout
    assert "kimivl ocr scan.pdf -o scan.md" in result.stdout


def test_unknown_command_is_a_usage_error() -> None:
    result = kimivl("frobnicate")
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:")
    assert "Traceback" not in result.stderr
