"""Outputs: nothing kimivl did not write is ever changed. 8: `quantize` never writes into its own
source, and a killed run's leftovers go with the next `--force`. 10: `--resume` and `-o` refuse
what is not a regular file (`/dev/zero`, a FIFO) instead of reading it forever or deleting it."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest
from PIL import Image

from tests.hostile.conftest import refused


def _digest(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


def test_quantize_into_its_own_source_is_refused_before_writing(kimivl, checkpoint: Path, tmp_path: Path) -> None:
    before = _digest(checkpoint)
    refused(kimivl("quantize", checkpoint, checkpoint, "--force", "--quant", "int8"), "is the source checkpoint")
    refused(kimivl("quantize", checkpoint, checkpoint / "q", "--quant", "int8"), "inside the source checkpoint")
    (tmp_path / "link").symlink_to(checkpoint)
    refused(kimivl("quantize", tmp_path / "link", checkpoint, "--force", "--quant", "int8"), "source checkpoint")
    assert _digest(checkpoint) == before and not (checkpoint / "q").exists()


def test_force_clears_what_a_killed_quantize_left(kimivl, checkpoint: Path, tmp_path: Path) -> None:
    dst = tmp_path / "q"
    (dst / ".kimivl-quantize-x1y2").mkdir(parents=True)
    (dst / ".kimivl-quantize-x1y2" / ".tmpA1b2C3").write_bytes(b"half a shard")
    (dst / ".tmpZ9y8X7").write_bytes(b"half a shard from a run without staging")
    (dst / "notes.txt").write_text("mine")  # not ours: kept
    refused(kimivl("quantize", checkpoint, dst, "--quant", "int8"), "already exists")
    result = kimivl("quantize", checkpoint, dst, "--quant", "int8", "--force")
    assert result.returncode == 0, result.stderr
    names = sorted(p.name for p in dst.iterdir())
    assert "notes.txt" in names and "model.safetensors" in names and not [n for n in names if n.startswith(".")]
    answer = kimivl("ask", "--model", dst, "--quant", "int8", "--max-tokens", "1", "--device", "cpu", "hi")
    assert answer.returncode == 0, answer.stderr


def test_quantize_keeps_links_out_of_the_source_out_of_the_copy(kimivl, checkpoint: Path, tmp_path: Path) -> None:
    secret = tmp_path / "secret.txt"
    secret.write_text("not part of any checkpoint")
    (checkpoint / "notes.md").symlink_to(secret)
    refused(kimivl("quantize", checkpoint, tmp_path / "q", "--quant", "int8"), "'notes.md' resolves outside")


def test_resume_from_a_device_is_refused(kimivl, tmp_path: Path) -> None:
    page = tmp_path / "page.png"
    Image.new("RGB", (64, 64), (255, 255, 255)).save(page)
    refused(kimivl("ocr", page, "--method", "text", "--resume", "-o", "/dev/zero"), "not a regular file")


@pytest.mark.parametrize("command", [("ocr", "--method", "text"), ("video-scenes", "--shots-only")])
def test_a_fifo_as_output_is_neither_read_nor_replaced(kimivl, tmp_path: Path, command: tuple[str, ...]) -> None:
    import cv2
    import numpy as np

    fifo = tmp_path / "out.fifo"
    os.mkfifo(fifo)
    if command[0] == "ocr":
        source = tmp_path / "page.png"
        Image.new("RGB", (64, 64), (255, 255, 255)).save(source)
    else:
        source = tmp_path / "clip.avi"
        writer = cv2.VideoWriter(str(source), cv2.VideoWriter_fourcc(*"MJPG"), 25, (32, 32))
        for _ in range(10):
            writer.write(np.zeros((32, 32, 3), np.uint8))
        writer.release()
    refused(kimivl(*command, source, "-o", fifo), "out.fifo")  # exists: refused without --force anyway
    for extra in (("--force",), ("--resume",) if command[0] == "ocr" else ("--force",)):
        refused(kimivl(*command, source, "-o", fifo, *extra), "not a regular file")
        assert fifo.is_fifo()  # never unlinked, replaced or opened
