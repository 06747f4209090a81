"""`kimivl video-scenes` as a user runs it: exit codes, one-line errors, --force, formats."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest


def kimivl(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "kimivl_cli", *args], capture_output=True, text=True, timeout=120)


def test_shots_only_json(bikes_mp4: Path) -> None:
    run = kimivl("video-scenes", str(bikes_mp4), "--shots-only", "--format", "json")
    assert run.returncode == 0, run.stderr
    doc = json.loads(run.stdout)
    assert [s["start_frame"] for s in doc["scenes"]] == [0, 30, 76, 137, 187, 242]
    assert "6 shots" in run.stderr


def test_output_file_needs_force(tmp_path: Path, synthetic_clip: Path) -> None:
    out = tmp_path / "clip.srt"
    out.write_text("keep me")
    run = kimivl("video-scenes", str(synthetic_clip), "--shots-only", "-f", "srt", "-o", str(out), "-q")
    assert run.returncode == 2 and run.stderr.count("\n") == 1 and "--force" in run.stderr
    assert out.read_text() == "keep me"
    run = kimivl("video-scenes", str(synthetic_clip), "--shots-only", "-f", "srt", "-o", str(out), "--force", "-q")
    assert run.returncode == 0 and run.stderr == ""
    assert out.read_text().startswith("1\n00:00:00,000 --> ")


@pytest.mark.parametrize(
    ("args", "code"),
    [
        (["/no/such/video.mp4", "--shots-only"], 2),
        (["{clip}", "--shots-only", "--format", "xml"], 2),
        (["{clip}", "{clip}", "--shots-only", "--format", "edl"], 2),
        (["{clip}", "--model", "/no/such/checkpoint"], 2),
        (["{clip}", "--shots-only", "--verify-shots"], 2),
    ],
)
def test_errors_are_one_line(synthetic_clip: Path, args: list[str], code: int) -> None:
    run = kimivl("video-scenes", *(a.format(clip=synthetic_clip) for a in args))
    assert run.returncode == code
    assert run.stderr.startswith("error: ") and run.stderr.count("\n") == 1 and "Traceback" not in run.stderr


def test_model_path_end_to_end(bikes_mp4: Path, tiny_checkpoint: Path) -> None:
    """Frames -> tiny random model -> parser -> scenes: garbage text falls back to the shots, with a warning."""
    run = kimivl(
        "video-scenes", str(bikes_mp4), "--model", str(tiny_checkpoint), "--device", "cpu",
        "--max-frames", "6", "--max-tokens", "8", "--temperature", "0", "--format", "json",
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    doc = json.loads(run.stdout)
    assert doc["frames"] == 250 and doc["fps"] == 25.0
    assert [s["start_frame"] for s in doc["scenes"]] == [0, 30, 76, 137, 187, 242]
    assert "warning: the model's answer had no usable scenes; using the detected shots" in run.stderr
