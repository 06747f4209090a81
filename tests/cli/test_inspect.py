"""`kimivl inspect` through the real CLI: real media, and broken inputs as one clean error line."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest


def kimivl(*args: str, stdin: bytes | None = None) -> subprocess.CompletedProcess[str]:
    result = subprocess.run([sys.executable, "-m", "kimivl_cli", *args], input=stdin, capture_output=True, timeout=120)
    return subprocess.CompletedProcess(result.args, result.returncode, result.stdout.decode(), result.stderr.decode())


def test_video_and_pdf_json(bikes_mp4: Path, libtasn1_pdf: Path) -> None:
    result = kimivl("inspect", str(bikes_mp4), str(libtasn1_pdf), "--json")
    assert result.returncode == 0, result.stderr
    video, pdf = json.loads(result.stdout)["inputs"]
    assert video["kind"] == "video" and video["frame_count"] == 250 and video["fps"] == 25
    assert (video["width"], video["height"], video["duration"]) == (640, 272, 10.0)
    assert video["tokens_per_frame"] > 0
    assert pdf["kind"] == "pdf" and pdf["page_count"] == 36 and len(pdf["pages"]) == 36
    assert pdf["bytes"] == libtasn1_pdf.stat().st_size
    assert all(p["tokens"] > 0 and p["words"] > 0 for p in pdf["pages"])


def test_text_summary(bikes_mp4: Path, libtasn1_pdf: Path) -> None:
    result = kimivl("inspect", str(bikes_mp4), str(libtasn1_pdf))
    assert result.returncode == 0, result.stderr
    video, pdf = result.stdout.strip().splitlines()
    assert "250 frames at 25 fps" in video and "10.00 s" in video and "tokens per frame" in video
    assert "36 pages" in pdf and "612x792 pt" in pdf and "text layer on 36 pages" in pdf


def test_images_from_stdin_and_folders(tmp_path: Path) -> None:
    from PIL import Image

    Image.new("RGB", (640, 480)).save(tmp_path / "b.png")
    Image.new("L", (28, 28)).save(tmp_path / "a.jpg")
    png = (tmp_path / "b.png").read_bytes()
    result = kimivl("inspect", "--json", str(tmp_path), "-", stdin=png)
    assert result.returncode == 0, result.stderr
    found = json.loads(result.stdout)["inputs"]
    assert [Path(i["name"]).name for i in found] == ["a.jpg", "b.png", "<stdin>"]
    assert found[0]["pages"] == [{"width": 28, "height": 28, "tokens": 1}]
    assert found[1]["pages"][0]["tokens"] == found[2]["pages"][0]["tokens"] > 300


def test_what_ask_takes_text_files_animations_and_the_default_frames(tmp_path: Path, bikes_mp4: Path) -> None:
    from PIL import Image

    frames = [Image.new("RGB", (32, 32), (40 * i, 0, 0)) for i in range(5)]
    frames[0].save(tmp_path / "anim.gif", save_all=True, append_images=frames[1:], duration=100)
    (tmp_path / "notes.jpg").write_text("Rider numbers: 7 and 12.\nSecond line\n")  # text, whatever the name
    result = kimivl("inspect", str(tmp_path / "anim.gif"), str(tmp_path / "notes.jpg"), str(bikes_mp4))
    assert result.returncode == 0, result.stderr
    gif, text, video = result.stdout.splitlines()
    assert "animated: 5 frames, the first is sent" in gif
    assert "text, " in text and "on 2 lines" in text and "inlined into the prompt" in text
    assert "230 tokens per frame, 1840 tokens for the default 8 frames" in video
    data = json.loads(kimivl("inspect", "--json", str(tmp_path), str(bikes_mp4)).stdout)["inputs"]
    assert [d["kind"] for d in data] == ["image", "text", "video"] and data[0]["animation_frames"] == 5
    assert data[2]["default_tokens"] == 8 * data[2]["tokens_per_frame"]


def broken_inputs(tmp: Path, libtasn1_pdf: Path, bikes_mp4: Path) -> dict[str, Path]:
    pdf, mp4 = libtasn1_pdf.read_bytes(), bikes_mp4.read_bytes()
    files = {
        "truncated.pdf": pdf[: len(pdf) // 2],
        "zero.png": b"",
        "truncated.mp4": mp4[: len(mp4) // 2],
        "text.jpg": b"just words, no pixels\n",
    }
    for name, data in files.items():
        (tmp / name).write_bytes(data)
    return {name: tmp / name for name in [*files, "missing.png"]}


@pytest.mark.parametrize(
    ("name", "says"),
    [
        ("truncated.pdf", "no readable pages"),
        ("zero.png", "is empty"),
        ("truncated.mp4", "not a readable video"),
        ("missing.png", "no such file"),
    ],
)
def test_broken_inputs_exit_2_with_one_line(
    tmp_path: Path, libtasn1_pdf: Path, bikes_mp4: Path, name: str, says: str
) -> None:
    path = broken_inputs(tmp_path, libtasn1_pdf, bikes_mp4)[name]
    result = kimivl("inspect", str(path))
    assert result.returncode == 2
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and name in lines[0] and says in lines[0]
    assert "Traceback" not in result.stderr and result.stdout == ""


def test_encrypted_pdf_needs_password(tmp_path: Path) -> None:
    import pymupdf

    doc = pymupdf.open()
    doc.new_page().insert_text((72, 72), "secret")
    doc.save(tmp_path / "locked.pdf", encryption=pymupdf.PDF_ENCRYPT_AES_256, owner_pw="o", user_pw="pw")
    locked = kimivl("inspect", str(tmp_path / "locked.pdf"))
    assert locked.returncode == 2 and "--password" in locked.stderr
    opened = kimivl("inspect", str(tmp_path / "locked.pdf"), "--password", "pw")
    assert opened.returncode == 0 and ", 1 page, " in opened.stdout and "1 pages" not in opened.stdout
