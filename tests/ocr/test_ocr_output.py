"""The OCR writer and reader: exact round trips, resume only on our own output, folders, truncation."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kimivl_cli.backends import Generation
from kimivl_cli.tasks.ocr.output import PageRecord, open_sink, read_pages
from tests.ocr.conftest import make_pdf

texts = st.text(max_size=300) | st.lists(
    st.sampled_from(["<!-- page: ", '"a.pdf" 1 crc32=00000000 -->', "\\", "\n", "-->", "x", "|"]), max_size=12
).map("".join)
names = st.text(min_size=1, max_size=40)


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(pages=st.lists(st.tuples(names, texts), min_size=1, max_size=5), fmt=st.sampled_from(["markdown", "jsonl"]))
def test_any_text_and_name_reads_back_exactly_after_a_resume(tmp_path_factory, pages, fmt) -> None:
    out = tmp_path_factory.mktemp("rt") / "out"
    records = [PageRecord(name, i + 1, text, "text", 0, 0.0) for i, (name, text) in enumerate(pages)]
    half = len(records) // 2
    sink, done = open_sink(out, fmt, force=False, resume=False)
    for record in records[:half]:
        sink.write(record)
    sink.close()
    if half:
        sink, done = open_sink(out, fmt, force=False, resume=True)
        assert done == {r.key for r in records[:half]}
    for record in records[half:]:
        sink.write(record)
    sink.close()
    stored, end = read_pages(out.read_bytes(), fmt)
    assert end == out.stat().st_size
    assert [(p.file, p.page, p.markdown, p.intact) for p in stored] == [
        (r.file, r.page, r.markdown, True) for r in records
    ]


@pytest.mark.parametrize("content", [b'{"a": 1}\n', b"no newline at all", b"name,page\n", b'{"file": "x.pdf"}'])
def test_jsonl_resume_refuses_a_foreign_file(run_kimivl, tmp_path: Path, content: bytes) -> None:
    pdf = make_pdf(tmp_path / "doc.pdf", ["words on a page"])
    out = tmp_path / "foreign.jsonl"
    out.write_bytes(content)
    result = run_kimivl("ocr", pdf, "--method", "text", "--jsonl", "-o", out, "--resume")
    assert result.returncode == 2 and "is not kimivl OCR output" in result.stderr
    assert out.read_bytes() == content


def test_markdown_resume_keeps_hand_edits(run_kimivl, tmp_path: Path) -> None:
    pdf = make_pdf(tmp_path / "doc.pdf", ["first page words", "second page words", "third page words"])
    out = tmp_path / "out.md"
    first = run_kimivl("ocr", pdf, "--method", "text", "--pages", "1-2", "-o", out)
    assert first.returncode == 0, first.stderr
    edited = out.read_text().replace("second page words", "second page words, corrected\nby hand")
    out.write_text(edited)
    again = run_kimivl("ocr", pdf, "--method", "text", "-o", out, "--resume")
    assert again.returncode == 0, again.stderr
    assert "1 pages written" in again.stderr and "2 already there" in again.stderr
    assert out.read_text().startswith(edited)  # nothing cut, the edit kept
    assert [p.page for p in read_pages(out.read_bytes(), "markdown")[0]] == [1, 2, 3]


def test_folder_output_one_file_per_input(run_kimivl, tmp_path: Path) -> None:
    a = make_pdf(tmp_path / "a.pdf", ["alpha words"])
    b = make_pdf(tmp_path / "b.pdf", ["beta words"])
    result = run_kimivl("ocr", a, b, "--method", "text", "-o", f"{tmp_path / 'new' / 'out'}/")
    assert result.returncode == 0, result.stderr
    folder = tmp_path / "new" / "out"
    assert sorted(p.name for p in folder.iterdir()) == ["a.md", "b.md"]
    assert "beta words" in (folder / "b.md").read_text()


def test_truncated_pages_warned_and_redone_in_place(run_kimivl, tmp_path: Path, ocr_bench_dir: Path) -> None:
    pdf = ocr_bench_dir / "pdfs" / "earnings.pdf"  # a table page: routed to the model
    out = tmp_path / "out.jsonl"
    cut = run_kimivl("ocr", pdf, "--jsonl", "-o", out, generate=lambda m, i: Generation("partial", 5, 8, "length"))
    assert cut.returncode == 0 and "cut at the token limit" in cut.stderr and "--redo-truncated" in cut.stderr
    assert json.loads(out.read_text())["finish_reason"] == "length"
    kept = run_kimivl("ocr", pdf, "--jsonl", "-o", out, "--resume", generate=lambda m, i: "whole page")
    assert "0 pages written" in kept.stderr
    redo = ["ocr", pdf, "--jsonl", "-o", out, "--resume", "--redo-truncated"]
    redone = run_kimivl(*redo, generate=lambda m, i: Generation("whole page", 5, 8, "stop"))
    assert redone.returncode == 0, redone.stderr
    (record,) = [json.loads(line) for line in out.read_text().splitlines()]
    assert (record["markdown"], record["finish_reason"]) == ("whole page", "stop")


def test_verbose_without_a_terminal_prints_a_line_per_page(run_kimivl, tmp_path: Path) -> None:
    pdf = make_pdf(tmp_path / "doc.pdf", ["one page of words", "another page of words"])
    result = run_kimivl("ocr", pdf, "--method", "text", "-v", "-o", tmp_path / "out.md")
    lines = [line for line in result.stderr.splitlines() if line.startswith("ocr: ")]
    assert len(lines) == 2 and "page 2: text (born-digital" in lines[1]
