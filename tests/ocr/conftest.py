"""Fixtures for the OCR tests: the olmOCR-Bench sample and small made-up inputs."""

from __future__ import annotations

import os
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
