"""The hostile corpus: generated bad inputs, each expected to end in one clear line, never a hang.

Every case is built here or in its test from a few bytes or a few generated pixels; nothing large
is committed. `refused` is the contract every bad input must meet: exit 2 (bad input) or 1 (a
true runtime failure), exactly one `error:` line on stderr (notes aside), no traceback, no
exception class name where a sentence belongs. `peak_rss` runs a command in a subprocess and
reads its peak resident memory from the kernel (VmHWM), for the memory budgets.
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


# The peak is the process's own VmHWM, read at exit: `wait4`'s `ru_maxrss` would not do, since Linux
# folds the forking parent's memory (the pytest worker's) into a child's maximum at exec.
_PEAK_RUNNER = """
import atexit, os, sys
def peak():
    with open("/proc/self/status") as status:
        kb = next(line.split()[1] for line in status if line.startswith("VmHWM:"))
    with open(os.environ["KIMIVL_TEST_PEAK_FILE"], "w") as out:
        out.write(kb)
atexit.register(peak)
sys.argv = ["kimivl", *sys.argv[1:]]
from kimivl_cli.cli import main
main()
"""


def peak_rss(*args: object, timeout: float = 120, stdin: bytes = b"") -> Run:
    """`kimivl ARGS` in a fresh process: its exit code, output and peak RSS in MiB (the kernel's own
    high-water mark of the process, VmHWM, not a sample). A hang fails the test."""
    with tempfile.TemporaryDirectory() as scratch:
        peak_file = Path(scratch) / "peak"
        env = {**os.environ, "KIMIVL_TEST_PEAK_FILE": str(peak_file)}
        try:
            proc = subprocess.run(
                [sys.executable, "-c", _PEAK_RUNNER, *map(str, args)],
                input=stdin,
                capture_output=True,
                timeout=timeout,
                cwd=ROOT,
                env=env,
            )
        except subprocess.TimeoutExpired:
            raise AssertionError(f"kimivl {' '.join(map(str, args))} hung for {timeout} s") from None
        peak_mb = int(peak_file.read_text()) / 1024
        decode = lambda data: data.decode(errors="replace")  # noqa: E731
        return Run(proc.returncode, decode(proc.stdout), decode(proc.stderr), peak_mb)


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
