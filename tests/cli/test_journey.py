"""Issue 17, tried as a new user would: each defect through the real CLI on generated checkpoints.

Progress and the thinking status on a pseudo-terminal (and nothing on a pipe), stderr free of
library lines, `-o folder/`, file modes, and one note (plus a `--json` field) per cap or ignored
option.
"""

from __future__ import annotations

import json
import logging
import os
import stat
import subprocess
import sys
from pathlib import Path

import pexpect
import pytest
from PIL import Image

from tests.render.test_render_answer import final_screen
from tests.serve.conftest import start_server  # noqa: F401  (fixture)
from tests.video.conftest import synthetic_clip  # noqa: F401  (fixture)

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "examples" / "chart.png"
ENV = {"PATH": "/usr/bin:/bin", "TERM": "xterm-256color", "OMP_NUM_THREADS": "1", "LANG": "C.UTF-8"}
KIMIVL_LINES = ("note: ", "warning: ", "error: ")


@pytest.fixture(scope="module")
def small_checkpoint() -> Path:
    from kimivl_cli.testing.checkpoint import cached_checkpoint

    return cached_checkpoint("small", seed=0)


def _pty(args: list[str], rows: int = 30, cols: int = 100) -> tuple[str, int]:
    """`kimivl ARGS` on a pseudo-terminal: (everything it drew, exit status)."""
    child = pexpect.spawn(
        sys.executable, ["-m", "kimivl_cli", *args], encoding="utf-8", codec_errors="replace", timeout=300,
        env=ENV, dimensions=(rows, cols), cwd=str(ROOT),
    )  # fmt: skip
    child.expect(pexpect.EOF)
    child.close()
    return child.before, child.exitstatus


def _pipe(args: list[str], stdin: bytes = b"", env: dict | None = None) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        [sys.executable, "-m", "kimivl_cli", *args], input=stdin, capture_output=True, timeout=300,
        env={**ENV, **(env or {})}, cwd=str(ROOT),
    )  # fmt: skip
    return subprocess.CompletedProcess(result.args, result.returncode, result.stdout.decode(), result.stderr.decode())


def test_loading_and_quantizing_show_a_bar_on_a_terminal_and_nothing_on_a_pipe(small_checkpoint: Path) -> None:
    args = ["ask", "-m", str(small_checkpoint), "--quant", "nf4", "Hello", "--max-tokens", "2"]
    drawn, status = _pty(args)
    assert status == 0, drawn
    assert f"loading {small_checkpoint.name}, quantizing to NF4" in drawn and " MB" in drawn  # bytes, as they load
    assert f"loading {small_checkpoint.name}" not in final_screen(drawn, 100, 30)  # the bar goes once loaded
    piped = _pipe(args)
    assert piped.returncode == 0 and "loading" not in piped.stderr + piped.stdout and "\x1b" not in piped.stderr


def test_a_hidden_trace_shows_a_thinking_status(tiny_checkpoint: Path, tmp_path: Path) -> None:
    thinking = tmp_path / "Kimi-VL-A3B-Thinking-tiny"
    os.symlink(tiny_checkpoint, thinking)
    # Random weights never start reasoning by themselves; with --schema a Thinking model is made to,
    # though a sampled trace may be empty: seed 2 gives one of three pieces.
    args = [
        "ask",
        "-m",
        str(thinking),
        "Hello",
        "--hide-thinking",
        "--schema",
        "n int",
        "--max-tokens",
        "40",
        "--seed",
        "2",
    ]
    drawn, status = _pty(args)
    assert status == 0, drawn
    assert "Thinking for" in drawn  # live, while the model reasons
    final = final_screen(drawn, 100, 30)
    assert "Thought for" in final and "╭─" not in drawn  # never the trace itself
    assert isinstance(json.loads(final.splitlines()[-1])["n"], int)
    piped = _pipe(args)
    assert piped.returncode == 0 and "Thinking" not in piped.stdout + piped.stderr
    assert isinstance(json.loads(piped.stdout)["n"], int)


def test_a_library_logging_on_import_is_not_shown(capfd: pytest.CaptureFixture[str]) -> None:
    """bitsandbytes logs a warning when imported on an AVX512-BF16 CPU without its optional kernels."""
    from kimivl_cli.cli import route_logs

    route_logs()
    logging.getLogger("bitsandbytes.backends.cpu.ops").warning("Failed to load CPU gemm_4bit_forward")
    import warnings

    warnings.warn("a library's deprecation", DeprecationWarning, stacklevel=1)
    assert capfd.readouterr().err == ""


def test_stderr_holds_only_kimivl_lines(
    tiny_checkpoint: Path,
    small_checkpoint: Path,
    synthetic_clip: Path,  # noqa: F811
) -> None:
    """Every model command on this machine (whatever its CPU flags), quiet and not."""
    runs = [
        (["ask", "-m", str(tiny_checkpoint), str(CHART), "What?", "--max-tokens", "3", "-q"], True),
        (["ask", "-m", str(small_checkpoint), "--quant", "nf4", "Hi", "--max-tokens", "3", "--json"], False),
        (
            ["video-scenes", str(synthetic_clip), "-m", str(tiny_checkpoint), "--max-frames", "2", "--max-tokens", "4"],
            False,
        ),
        (["inspect", str(CHART)], True),
    ]
    for args, silent in runs:
        result = _pipe(args)
        assert result.returncode == 0, result.stderr
        lines = result.stderr.splitlines()
        if silent:
            assert lines == [], args
        else:
            own = [line for line in lines if line.startswith(KIMIVL_LINES) or line.startswith(synthetic_clip.name)]
            assert own == lines, args


def test_video_scenes_output_folders(tmp_path: Path, bikes_mp4: Path, synthetic_clip: Path) -> None:  # noqa: F811
    out = tmp_path / "new" / "scenes"
    result = _pipe(["video-scenes", str(bikes_mp4), str(synthetic_clip), "--shots-only", "-o", f"{out}/", "-f", "srt"])
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in out.iterdir()) == ["bikes.srt", "synthetic.srt"]
    one = tmp_path / "one"
    result = _pipe(["video-scenes", str(bikes_mp4), "--shots-only", "-o", f"{one}/", "-f", "json", "-q"])
    assert result.returncode == 0 and one.is_dir() and json.loads((one / "bikes.json").read_text())["frames"] == 250
    chapters = _pipe(["video-scenes", str(bikes_mp4), "--shots-only", "-o", f"{one}/", "-f", "chapters", "-q"])
    assert chapters.returncode == 0 and (one / "bikes.chapters.txt").read_text().startswith("0:00 Scene 1\n")
    clash = tmp_path / "file"
    clash.write_text("x")
    refused = _pipe(["video-scenes", str(bikes_mp4), "--shots-only", "-o", f"{clash}/", "-q"])
    assert refused.returncode == 2 and "is a file, not a folder" in refused.stderr


def test_written_files_follow_the_umask(tmp_path: Path, bikes_mp4: Path, small_checkpoint: Path) -> None:
    def run(args: list[str]) -> None:
        result = subprocess.run(
            [sys.executable, "-m", "kimivl_cli", *args],
            capture_output=True,
            env=ENV,
            preexec_fn=lambda: os.umask(0o027),
        )
        assert result.returncode == 0, result.stderr

    run(["video-scenes", str(bikes_mp4), "--shots-only", "-o", str(tmp_path / "s.csv"), "-f", "csv", "-q"])
    run(["quantize", str(small_checkpoint), str(tmp_path / "q"), "-q"])
    for path in [tmp_path / "s.csv", *(tmp_path / "q").iterdir()]:
        assert stat.S_IMODE(path.stat().st_mode) == 0o640, path


def test_capped_skipped_and_ignored_options_each_get_a_note_and_a_json_field(
    kimivl, tiny_checkpoint: Path, tmp_path: Path
) -> None:
    import cv2
    import numpy as np

    clip = tmp_path / "clip.avi"  # 80 small frames: enough to hit the 64-frame cap, cheap to encode
    writer = cv2.VideoWriter(str(clip), cv2.VideoWriter_fourcc(*"MJPG"), 25.0, (28, 28))
    for i in range(80):
        writer.write(np.full((28, 28, 3), i * 3, np.uint8))
    writer.release()
    folder = tmp_path / "inputs"
    folder.mkdir()
    Image.new("RGB", (28, 28), (9, 9, 9)).save(folder / "a.png")
    (folder / "b.txt").write_text("Some notes.")
    (folder / "c.bin").write_bytes(bytes(range(256)) * 4)
    result = kimivl(
        "ask", "-m", tiny_checkpoint, folder, clip, "What?", "--frames", 250, "--max-tokens", 2, "--json"
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    frames = next(n for n in data["notes"] if "--frames 250" in n)
    assert "sending 64" in frames and "at most 64" in frames
    listing = next(n for n in data["notes"] if "from " + str(folder) in n)
    assert "sending 2 files" in listing and "skipped 1" in listing and "c.bin" in listing
    assert data["inputs"]["skipped"] == [str(folder / "c.bin")] and len(data["inputs"]["sent"]) == 3
    assert result.stderr.count("note: ") == 2 and "--frames 250" in result.stderr and "c.bin" in result.stderr


def test_a_thinking_budget_sent_to_a_server_is_noted(kimivl, start_server) -> None:  # noqa: F811
    from tests.serve.conftest import ScriptedBackend

    backend = ScriptedBackend()
    server = start_server(backend)
    args = ["ask", "Hi", "--backend", "openai", "--api-base", server.url, "--thinking-budget", "5", "--json"]
    result = kimivl(*args, "--quant", "nf4")
    assert result.returncode == 0, result.stderr
    notes = json.loads(result.stdout)["notes"]
    assert any("--thinking-budget 5" in n and "kimivl serve honours it" in n for n in notes)
    assert any("--quant nf4 ignored" in n for n in notes) and result.stderr.count("note: ") == 2
    assert backend.calls[0][2].thinking_budget == 5  # and kimivl serve gets it


def test_quant_none_on_a_prequantized_checkpoint_and_int8_are_said(
    kimivl, small_checkpoint: Path, tmp_path: Path
) -> None:
    assert kimivl("quantize", small_checkpoint, tmp_path / "q4", "-q").returncode == 0
    result = kimivl("ask", "-m", tmp_path / "q4", "--quant", "none", "Hi", "--max-tokens", 2, "--json")
    assert result.returncode == 0, result.stderr
    note = "--quant none ignored: " + str(tmp_path / "q4") + " was saved quantized as nf4, so it loads as nf4"
    assert json.loads(result.stdout)["notes"] == [note] and result.stderr == f"note: {note}\n"
    int8 = kimivl("ask", "-m", small_checkpoint, "--quant", "int8", "Hi", "--max-tokens", 2, "--json")
    assert any("routed experts" in n for n in json.loads(int8.stdout)["notes"])
    assert "routed experts" in kimivl("ask", "--help").stdout and "routed experts" in kimivl("info").stdout


def test_serve_loads_with_a_bar_on_a_terminal(tiny_checkpoint: Path) -> None:
    """The server prints where it listens once loaded; on a pseudo-terminal the load shows a bar."""
    child = pexpect.spawn(
        sys.executable, ["-m", "kimivl_cli", "serve", "-m", str(tiny_checkpoint), "--port", "0"],
        encoding="utf-8", codec_errors="replace", timeout=120, env=ENV, dimensions=(30, 100),
    )  # fmt: skip
    try:
        child.expect("serving .* at http")
        assert f"loading {tiny_checkpoint.name}" in child.before
    finally:
        child.sendintr()
        child.expect(pexpect.EOF)
        child.close()
