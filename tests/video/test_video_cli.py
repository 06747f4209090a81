"""`kimivl video-scenes` as a user runs it: exit codes, one-line errors, --force, formats."""

from __future__ import annotations

import csv
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from kimivl_cli.errors import InputError
from kimivl_cli.tasks.video_scenes.pipeline import check_request


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


def test_several_videos_one_file_each(tmp_path: Path, synthetic_clip: Path, bikes_mp4: Path) -> None:
    """`-o FOLDER` writes FOLDER/<stem>.<ext> per video, for formats that hold one video too (in-process)."""
    from typer.testing import CliRunner

    from kimivl_cli.cli import app

    out = tmp_path / "out"
    out.mkdir()
    args = ["video-scenes", str(synthetic_clip), str(bikes_mp4), "--shots-only", "-f", "csv", "-o", str(out), "-q"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in out.iterdir()) == ["bikes.csv", "synthetic.csv"]
    rows = list(csv.reader((out / "bikes.csv").read_text().splitlines()))
    assert [row[1] for row in rows[2:]] == ["1", "31", "77", "138", "188", "243"]  # 1-based start frames


def test_several_videos_refusals(tmp_path: Path, synthetic_clip: Path) -> None:
    twin = tmp_path / "other" / synthetic_clip.name
    twin.parent.mkdir()
    twin.write_bytes(synthetic_clip.read_bytes())
    with pytest.raises(InputError, match="would both be written"):
        check_request([str(synthetic_clip), str(twin)], "srt", str(tmp_path), force=False)
    (tmp_path / "synthetic.srt").write_text("keep")
    with pytest.raises(InputError, match="already exists"):
        check_request([str(synthetic_clip)], "srt", str(tmp_path), force=False)
    assert check_request([str(synthetic_clip)], "chapters", str(tmp_path), force=False) == [
        tmp_path / "synthetic.chapters.txt"
    ]
    assert check_request([str(synthetic_clip)], "ffmetadata", str(tmp_path), force=False) == [
        tmp_path / "synthetic.ffmetadata.txt"
    ]
    with pytest.raises(InputError) as refused:
        check_request([str(synthetic_clip), str(twin)], "vtt", None, force=False)
    assert "-o FOLDER" in refused.value.one_line()


def test_video_paths_sniff_content_and_expand_folders(tmp_path: Path, synthetic_clip: Path) -> None:
    from kimivl_cli.cli.video_scenes import video_paths

    (tmp_path / "b.avi").write_bytes(synthetic_clip.read_bytes())
    (tmp_path / "a.mp4").write_text("not a video, whatever the name says")
    assert video_paths([str(tmp_path)]) == [str(tmp_path / "b.avi")]
    with pytest.raises(InputError, match="not a video"):
        video_paths([str(tmp_path / "a.mp4")])


def test_the_local_model_is_held_to_the_scene_json(synthetic_clip: Path, tiny_checkpoint: Path) -> None:
    """Random weights, but grammar-constrained: the answer always parses into scenes on shot starts."""
    shots = json.loads(kimivl("video-scenes", str(synthetic_clip), "--shots-only", "-q").stdout)["scenes"]
    run = kimivl(
        "video-scenes", str(synthetic_clip), "--model", str(tiny_checkpoint), "--max-frames", "2",
        "--max-tokens", "100", "--seed", "1", "--format", "json",
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    assert "warning" not in run.stderr  # no fallback to the bare shots
    scenes = json.loads(run.stdout)["scenes"]
    assert scenes[0]["start_frame"] == 0 and {s["start_frame"] for s in scenes} <= {s["start_frame"] for s in shots}
    assert any(s["description"] for s in scenes)


def test_a_bar_counts_the_videos_described_on_a_terminal(synthetic_clip: Path, tiny_checkpoint: Path) -> None:
    import pexpect

    args = ["-m", "kimivl_cli", "video-scenes", str(synthetic_clip), "-m", str(tiny_checkpoint), "--max-tokens", "8"]
    child = pexpect.spawn(sys.executable, args, encoding="utf-8", codec_errors="replace", timeout=300)
    child.expect(pexpect.EOF)
    child.close()
    drawn = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", child.before)
    assert child.exitstatus == 0 and "scenes described" in drawn and "0/1 videos" in drawn
