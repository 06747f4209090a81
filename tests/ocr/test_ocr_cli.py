"""`kimivl ocr` through the real CLI (`cli.main`), in-process except where a signal must reach a
process; the model is a fake where one is needed (tests/ocr/test_ocr_model.py runs the real engine)."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pymupdf
import pytest
from ocr_helpers import ROOT, fake_generate, kimivl_command
from PIL import Image

from kimivl_cli.tasks.ocr.output import read_pages
from tests.ocr.conftest import make_pdf


def words(text: str) -> Counter[str]:
    """Alphanumeric tokens: Markdown markup and escapes do not count, words do."""
    text = re.sub(r"(\w)-\n([a-z])", r"\1\2", text)  # the same end-of-line hyphen joining as the writer
    return Counter(re.findall(r"[A-Za-z0-9]+", text))


def page_keys(path: Path) -> list[tuple[str, int]]:
    return [(r["file"], r["page"]) for r in map(json.loads, path.read_text().splitlines())]


def test_text_method_keeps_every_word_of_the_text_layer(run_kimivl, libtasn1_pdf: Path) -> None:
    result = run_kimivl("ocr", libtasn1_pdf, "--method", "text", "--keep-headers")
    assert result.returncode == 0, result.stderr
    sections = [p.markdown for p in read_pages(result.stdout.encode(), "markdown")[0]]
    doc = pymupdf.open(libtasn1_pdf)
    assert len(sections) == doc.page_count
    for page, markdown in zip(doc, sections, strict=True):
        assert words(markdown) == words(page.get_text()), f"page {page.number + 1}"


def test_headers_and_page_numbers_dropped_by_default(run_kimivl, libtasn1_pdf: Path) -> None:
    result = run_kimivl("ocr", libtasn1_pdf, "--method", "text", "--pages", "14")
    assert result.returncode == 0, result.stderr
    assert "Chapter 4: Function reference" not in result.stdout  # the running head
    assert not re.search(r"^12$", result.stdout, flags=re.MULTILINE)  # the page number
    assert "asn1_" in result.stdout


def test_jsonl_pages_then_resume_does_nothing(run_kimivl, libtasn1_pdf: Path, tmp_path: Path) -> None:
    out = tmp_path / "out.jsonl"
    first = run_kimivl("ocr", libtasn1_pdf, "--pages", "1-3", "--jsonl", "--method", "text", "-o", out)
    assert first.returncode == 0, first.stderr
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["page"] for r in records] == [1, 2, 3]
    assert set(records[0]) == {
        "file",
        "page",
        "markdown",
        "method",
        "tokens",
        "seconds",
        "route",
        "reason",
        "blank",
        "finish_reason",
    }
    assert {r["method"] for r in records} == {"text"}
    assert all(r["reason"] for r in records)
    again = run_kimivl("ocr", libtasn1_pdf, "--pages", "1-3", "--jsonl", "--method", "text", "-o", out, "--resume")
    assert again.returncode == 0, again.stderr
    assert "0 pages written" in again.stderr and "3 already there" in again.stderr
    assert len(out.read_text().splitlines()) == 3


def test_existing_output_needs_force(run_kimivl, libtasn1_pdf: Path, tmp_path: Path) -> None:
    out = tmp_path / "out.md"
    out.write_text("precious\n")
    refused = run_kimivl("ocr", libtasn1_pdf, "--pages", "1", "--method", "text", "-o", out)
    assert refused.returncode == 2 and "--force" in refused.stderr
    assert out.read_text() == "precious\n"
    forced = run_kimivl("ocr", libtasn1_pdf, "--pages", "1", "--method", "text", "-o", out, "--force")
    assert forced.returncode == 0 and out.read_text().startswith("<!-- page: ")
    assert oct(out.stat().st_mode & 0o777) == oct(0o666 & ~_umask())


@pytest.mark.parametrize(
    ("fmt", "jobs", "sig"),
    [
        ("markdown", 1, signal.SIGINT),
        ("jsonl", 1, signal.SIGINT),
        ("jsonl", 3, signal.SIGINT),
        ("markdown", 1, signal.SIGTERM),
    ],
)
def test_sigint_keeps_finished_pages_and_resume_completes(
    run_kimivl, libtasn1_pdf: Path, tmp_path: Path, fmt: str, jobs: int, sig: int
) -> None:
    """Also with --concurrency 3: requests still running are abandoned, written pages stay whole."""
    out = tmp_path / f"out.{fmt}"
    args = ["ocr", libtasn1_pdf, "--pages", "5-9", "--method", "vision", "-o", out, "--dpi", "20", "-j", jobs]
    args += ["--jsonl"] if fmt == "jsonl" else []
    env = {**os.environ, "FAKE_OCR_DELAY": "0.4"}
    proc = subprocess.Popen(
        kimivl_command(*map(str, args), fake_model=True), env=env, cwd=ROOT, stderr=subprocess.PIPE, text=True
    )
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and (
        not out.exists() or out.read_text().count("crc32=" if fmt == "markdown" else "\n") < 2
    ):
        time.sleep(0.05)
    proc.send_signal(sig)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == (130 if sig == signal.SIGINT else 143), stderr
    assert "finished pages are in" in stderr
    finished = read_pages(out.read_bytes(), fmt)[0]  # type: ignore[arg-type]
    assert 2 <= len(finished) < 5
    resumed = run_kimivl(*args, "--resume", generate=fake_generate)
    assert resumed.returncode == 0, resumed.stderr
    assert f"{5 - len(finished)} pages written" in resumed.stderr
    keys = [p.key for p in read_pages(out.read_bytes(), fmt)[0]]  # type: ignore[arg-type]
    assert sorted(p for _, p in keys) == [5, 6, 7, 8, 9]  # each page once


def test_folder_of_mixed_files_in_stable_order(run_kimivl, tmp_path: Path, ocr_bench_dir: Path) -> None:
    folder = tmp_path / "docs"
    (folder / "sub").mkdir(parents=True)
    shutil.copy(ocr_bench_dir / "pdfs" / "olmo2-pg4.pdf", folder / "b.pdf")
    make_pdf(folder / "sub" / "a.pdf", ["alpha page one", "alpha page two"])
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (120, 200, 3), dtype=np.uint8)).save(folder / "c.png")
    (folder / "notes.txt").write_text("not a document")
    out = tmp_path / "out.jsonl"
    result = run_kimivl("ocr", folder, "--jsonl", "-o", out, generate=fake_generate)
    assert result.returncode == 0, result.stderr
    records = [json.loads(line) for line in out.read_text().splitlines()]
    names = [(Path(r["file"]).relative_to(folder).as_posix(), r["page"], r["method"]) for r in records]
    assert names == [
        ("b.pdf", 1, "anchored"),
        ("c.png", 1, "vision"),
        ("sub/a.pdf", 1, "text"),  # prose: the text path, no model
        ("sub/a.pdf", 2, "text"),
    ]
    assert records[1]["markdown"].startswith("# Fake page") and "```" not in records[1]["markdown"]
    assert [r["tokens"] > 0 for r in records] == [True, True, False, False]


@pytest.mark.parametrize("method", ["text", "auto"])
def test_blank_pages_write_nothing(run_kimivl, tmp_path: Path, method: str) -> None:
    pdf = make_pdf(tmp_path / "blank.pdf", ["", "hello world"])
    result = run_kimivl("ocr", pdf, "--method", method, "--jsonl", generate=fake_generate)
    assert result.returncode == 0, result.stderr
    records = [json.loads(line) for line in result.stdout.splitlines()]
    assert [(r["page"], r["method"], r["blank"]) for r in records] == [(1, "blank", True), (2, "text", False)]
    assert records[0]["markdown"] == "" and records[1]["markdown"] == "hello world"
    markdown = run_kimivl("ocr", pdf, "--method", method, generate=fake_generate)
    assert [p.markdown for p in read_pages(markdown.stdout.encode(), "markdown")[0]] == ["", "hello world"]


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@pytest.mark.parametrize(
    "case", ["encrypted", "corrupt", "bad range", "range past the end", "missing file", "bad method"]
)
def test_bad_inputs_exit_2_with_one_line(run_kimivl, tmp_path: Path, case: str) -> None:
    pdf = make_pdf(tmp_path / "ok.pdf", ["one", "two"])
    args: list[object] = ["ocr", pdf, "--method", "text"]
    if case == "encrypted":
        args[1] = make_pdf(
            tmp_path / "locked.pdf", ["secret"], encryption=pymupdf.PDF_ENCRYPT_AES_256, user_pw="pw", owner_pw="pw"
        )
    elif case == "corrupt":
        args[1] = tmp_path / "bad.pdf"
        args[1].write_bytes(b"%PDF-1.7\n" + bytes(range(256)) * 4)
    elif case == "bad range":
        args += ["--pages", "3-x"]
    elif case == "range past the end":
        args += ["--pages", "2-5"]
    elif case == "missing file":
        args[1] = tmp_path / "nope.pdf"
    else:
        args[3] = "ocr-magic"
    result = run_kimivl(*args)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), result.stderr
    assert result.stdout == ""


def test_encrypted_pdf_opens_with_password(run_kimivl, tmp_path: Path) -> None:
    pdf = make_pdf(
        tmp_path / "locked.pdf", ["secret words"], encryption=pymupdf.PDF_ENCRYPT_AES_256, user_pw="pw", owner_pw="pw"
    )
    result = run_kimivl("ocr", pdf, "--method", "text", "--password", "pw")
    assert result.returncode == 0, result.stderr
    assert "secret words" in result.stdout


def test_prompt_file_replaces_the_instruction(run_kimivl, tmp_path: Path, ocr_bench_dir: Path) -> None:
    pdf = ocr_bench_dir / "pdfs" / "olmo2-pg4.pdf"  # a ruled table: routed to the model
    seen: list[str] = []

    def generate(messages: list[dict], images: list) -> str:
        seen.append(messages[0]["content"][-1]["text"])
        return "ok"

    (tmp_path / "mine.md").write_text("Transcribe it my way.\n")
    result = run_kimivl("ocr", pdf, "--prompt-file", tmp_path / "mine.md", generate=generate)
    assert result.returncode == 0, result.stderr
    assert seen[0].startswith("Transcribe it my way.") and "Source" in seen[0]  # anchors appended
    missing = run_kimivl("ocr", pdf, "--prompt-file", tmp_path / "nope.md", generate=generate)
    assert missing.returncode == 2 and missing.stderr.startswith("error: cannot read prompt file")
    assert len(seen) == 1
