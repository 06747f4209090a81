"""The hostile corpus: generated bad inputs, each expected to end in one clear line, never a hang.

Every case is built here or in its test from a few bytes or a few generated pixels; nothing large
is committed. `refused` is the contract every bad input must meet: exit 2 (bad input) or 1 (a
true runtime failure), exactly one `error:` line on stderr (notes aside), no traceback, no
exception class name where a sentence belongs. `peak_rss` runs a command in a subprocess and
reads its peak resident memory from the kernel (`wait4`), for the memory budgets.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import struct
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.serve.conftest import start_server  # noqa: F401  (the fixture, for the serve cases here)

ROOT = Path(__file__).resolve().parents[2]
EXCEPTION_NAME = re.compile(r"\b[A-Z]\w*(Error|Exception)\b")


def refused(result, *needles: str, code: int = 2) -> str:
    """The one `error:` line of a refused command (asserting the contract); notes may precede it."""
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    errors = [line for line in lines if not line.startswith("note: ")]
    assert result.returncode == code, f"exit {result.returncode}, wanted {code}: {result.stderr}"
    assert len(errors) == 1 and errors[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.stderr and not EXCEPTION_NAME.search(errors[0]), errors[0]
    for needle in needles:
        assert needle in errors[0], f"{needle!r} not in {errors[0]!r}"
    return errors[0]


@dataclass
class Run:
    returncode: int
    stdout: str
    stderr: str
    peak_mb: float


def peak_rss(*args: object, timeout: float = 120, stdin: bytes = b"") -> Run:
    """`kimivl ARGS` in a fresh process: its exit code, output and peak RSS in MiB (`ru_maxrss`,
    from `wait4`: the kernel's own high-water mark, not a sample). A hang fails the test."""
    command = [sys.executable, "-m", "kimivl_cli", *map(str, args)]
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err, tempfile.TemporaryFile() as given:
        given.write(stdin)
        given.seek(0)
        proc = subprocess.Popen(command, stdin=given, stdout=out, stderr=err, cwd=ROOT)
        deadline = time.monotonic() + timeout
        while not (reaped := os.wait4(proc.pid, os.WNOHANG))[0]:
            if time.monotonic() > deadline:
                proc.kill()
                os.wait4(proc.pid, 0)
                proc.returncode = -9
                raise AssertionError(f"kimivl {' '.join(map(str, args))} hung for {timeout} s")
            time.sleep(0.02)
        _, status, usage = reaped
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        text = out.read().decode(errors="replace"), err.read().decode(errors="replace")
        return Run(proc.returncode, *text, usage.ru_maxrss / 1024)


def write_json(path: Path, data: object) -> None:
    path.write_text(json.dumps(data), encoding="utf-8")


def nested_json(depth: int) -> str:
    """`depth` nested arrays: valid JSON that a recursive parser cannot finish."""
    return "[" * depth + "]" * depth


def safetensors_bytes(header: dict, data: bytes) -> bytes:
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + data


@pytest.fixture
def checkpoint(tiny_checkpoint: Path, tmp_path: Path) -> Path:
    """A private copy of the generated tiny checkpoint, for a test to break."""
    return Path(shutil.copytree(tiny_checkpoint, tmp_path / "ckpt"))


@pytest.fixture
def edit_config(checkpoint: Path):
    def edit(section: str | None, **fields: object) -> Path:
        path = checkpoint / "config.json"
        config = json.loads(path.read_text())
        (config[section] if section else config).update(fields)
        write_json(path, config)
        return checkpoint

    return edit


@pytest.fixture(scope="session")
def fifo_factory(tmp_path_factory: pytest.TempPathFactory):
    if not hasattr(os, "mkfifo"):
        pytest.skip("no FIFOs on this platform")
    root = tmp_path_factory.mktemp("fifos")

    def make(name: str) -> Path:
        path = root / name
        os.mkfifo(path)
        return path

    return make
