"""Fixtures for the OCR tests: the olmOCR-Bench sample and small made-up inputs."""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path

import pymupdf
import pytest

SHARED = Path(os.environ.get("KIMIVL_SHARED", Path(__file__).resolve().parents[3] / "shared"))


@pytest.fixture(scope="session")
def ocr_bench_dir() -> Path:
    path = SHARED / "ocr-bench"
    if not path.exists():
        pytest.skip(f"shared data not found: {path} (set KIMIVL_SHARED)")
    return path


def make_pdf(path: Path, pages: list[str], **save_options: object) -> Path:
    """A text PDF with one short paragraph per page (an empty string gives a blank page)."""
    doc = pymupdf.open()
    for text in pages:
        page = doc.new_page()
        if text:
            page.insert_text((72, 100), text, fontsize=11)
    doc.save(path, **save_options)
    return path


@dataclass
class Result:
    returncode: int
    stdout: str
    stderr: str


@pytest.fixture
def run_kimivl(capfd: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch):
    """`kimivl ARGS` in this process through `cli.main` (the same one-line errors and exit codes as
    the console script), output captured at the file-descriptor level. `generate=` answers for the
    backend the CLI opens. Saves the ~2 s of a subprocess where the process boundary adds nothing."""
    from ocr_helpers import use_fake_model

    from kimivl_cli import cli

    def run(*args: object, generate=None) -> Result:
        if generate is not None:
            use_fake_model(generate, monkeypatch.setattr)
        monkeypatch.setattr(sys, "argv", ["kimivl", *map(str, args)])
        capfd.readouterr()
        try:
            cli.main()
            code = 0
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 1
        out, err = capfd.readouterr()
        return Result(code, out, err)

    return run
