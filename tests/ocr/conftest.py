"""Fixtures for the OCR tests: the olmOCR-Bench sample and small made-up inputs."""

from __future__ import annotations

from pathlib import Path

import pymupdf
import pytest

from tests.conftest import shared_path


@pytest.fixture(scope="session")
def ocr_bench_dir() -> Path:
    return shared_path("ocr-bench")


def make_pdf(path: Path, pages: list[str], **save_options: object) -> Path:
    """A text PDF with one short paragraph per page (an empty string gives a blank page)."""
    doc = pymupdf.open()
    for text in pages:
        page = doc.new_page()
        if text:
            page.insert_text((72, 100), text, fontsize=11)
    doc.save(path, **save_options)
    return path


@pytest.fixture
def run_kimivl(kimivl, monkeypatch: pytest.MonkeyPatch):
    """The in-process `kimivl` runner (root conftest); `generate=` answers for the backend the CLI opens."""
    from ocr_helpers import use_fake_model

    def run(*args: object, generate=None):
        if generate is not None:
            use_fake_model(generate, monkeypatch.setattr)
        return kimivl(*args)

    return run
