"""`--method text` rules and `--method auto` routing on generated PDFs (one rule, one page each)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pymupdf
import pytest
from PIL import Image

from kimivl_cli.media import PdfDocument
from kimivl_cli.tasks.ocr import textlayer
from kimivl_cli.tasks.ocr.routing import route_page
from tests.ocr.conftest import make_pdf

PROSE = (
    "The committee met on Tuesday to review the annual budget and the plans for the new library wing. "
    "Members agreed that the reading rooms should open before the winter term, and asked the treasurer "
    "to prepare a revised estimate of the heating costs for the next meeting of the board."
)


def _markdown(path: Path) -> str:
    doc = pymupdf.open(path)
    return textlayer.page_markdown(doc[0], textlayer.document_style(doc))


def _page(doc: pymupdf.Document) -> pymupdf.Page:
    return doc.new_page(width=595, height=842)


def test_one_page_running_header_and_page_number_dropped(tmp_path: Path) -> None:
    doc = pymupdf.open()
    page = _page(doc)
    page.insert_text((72, 50), "Journal of Municipal Affairs, Vol. 12", fontsize=8)
    page.insert_textbox(pymupdf.Rect(72, 120, 523, 400), PROSE * 2, fontsize=11)
    page.insert_text((290, 800), "17", fontsize=9)
    doc.save(tmp_path / "header.pdf")
    markdown = _markdown(tmp_path / "header.pdf")
    assert "Journal of Municipal Affairs" not in markdown and "17" not in markdown
    assert "annual budget" in markdown


def test_ruled_and_borderless_tables_become_markdown_tables(tmp_path: Path) -> None:
    rows = [
        ["Region", "Sales", "Growth"],
        ["North", "1,204", "3.1%"],
        ["South", "987", "2.4%"],
        ["East", "1,530", "5.0%"],
    ]
    doc = pymupdf.open()
    for ruled in (True, False):
        page = _page(doc)
        page.insert_textbox(pymupdf.Rect(72, 72, 523, 160), PROSE, fontsize=11)
        for r, row in enumerate(rows):
            y = 220 + 24 * r
            for c, cell in enumerate(row):
                page.insert_text((90 + 150 * c, y), cell, fontsize=11)
            if ruled:
                page.draw_line((80, y - 16), (520, y - 16))
        if ruled:
            page.draw_line((80, 220 + 24 * len(rows) - 16), (520, 220 + 24 * len(rows) - 16))
            for x in (80, 230, 380, 520):
                page.draw_line((x, 204), (x, 220 + 24 * len(rows) - 16))
    doc.save(tmp_path / "tables.pdf")
    style = textlayer.document_style(doc)
    for page in pymupdf.open(tmp_path / "tables.pdf"):
        markdown = textlayer.page_markdown(page, style)
        table = [line for line in markdown.splitlines() if line.startswith("|")]
        assert table[0].replace(" ", "") == "|Region|Sales|Growth|", markdown
        assert table[1].startswith("|---") and "| South | 987 | 2.4% |" in table, markdown
        assert "annual budget" in markdown and "Region" not in markdown.split("|")[0]


def test_two_columns_read_column_by_column(tmp_path: Path) -> None:
    doc = pymupdf.open()
    page = _page(doc)
    page.insert_text((72, 130), "A Study of Two Columns", fontsize=18)
    left = "LEFTSTART " + PROSE + " LEFTEND"
    right = "RIGHTSTART " + PROSE + " RIGHTEND"
    page.insert_textbox(pymupdf.Rect(72, 160, 290, 560), left, fontsize=10)
    page.insert_textbox(pymupdf.Rect(310, 160, 523, 560), right, fontsize=10)
    doc.save(tmp_path / "columns.pdf")
    markdown = _markdown(tmp_path / "columns.pdf")
    positions = [markdown.index(word) for word in ("A Study", "LEFTSTART", "LEFTEND", "RIGHTSTART", "RIGHTEND")]
    assert positions == sorted(positions), markdown


@pytest.mark.parametrize("name", ["Ján Mináč", "J\u00b4an Min\u00b4a\u02c7c"])  # composed, or accents as glyphs
def test_accented_names_survive_composed(tmp_path: Path, name: str) -> None:
    doc = pymupdf.open()
    page = _page(doc)
    page.insert_htmlbox(pymupdf.Rect(72, 300, 523, 360), f"We also thank {name} for his constant support.")
    doc.save(tmp_path / "accents.pdf")
    assert "We also thank Ján Mináč for his constant support." in _markdown(tmp_path / "accents.pdf")


def test_drop_cap_joined_to_its_word(tmp_path: Path) -> None:
    doc = pymupdf.open()
    page = _page(doc)
    page.insert_text((72, 140), "O", fontsize=40)
    page.insert_textbox(pymupdf.Rect(105, 108, 523, 300), "ver the past three decades " + PROSE, fontsize=11)
    doc.save(tmp_path / "dropcap.pdf")
    assert "Over the past three decades" in _markdown(tmp_path / "dropcap.pdf")


def _scanned_pdf(path: Path) -> Path:
    """Page 1 prose with a text layer, page 2 a scan (an image of text, no text layer)."""
    doc = pymupdf.open()
    _page(doc).insert_textbox(pymupdf.Rect(72, 120, 523, 400), PROSE, fontsize=11)
    rng = np.random.default_rng(1)
    ink = np.full((800, 600), 255, np.uint8)
    for y in range(100, 700, 30):
        ink[y : y + 12, 80:520] = np.where(rng.random((12, 440)) < 0.4, 0, 255)
    scan = path.with_suffix(".png")
    Image.fromarray(ink).save(scan)
    _page(doc).insert_image(pymupdf.Rect(0, 0, 595, 842), filename=str(scan))
    doc.save(path)
    return path


def test_text_method_on_a_scan_writes_what_it_can_and_never_loads_a_model(run_kimivl, tmp_path: Path) -> None:
    pdf = _scanned_pdf(tmp_path / "scan.pdf")

    def no_model(messages, images):
        raise AssertionError("--method text must not reach the model")

    out = tmp_path / "out.jsonl"
    result = run_kimivl("ocr", pdf, "--method", "text", "--jsonl", "-o", out, generate=no_model)
    assert result.returncode == 1, result.stderr
    assert "scan.pdf p2 (scanned: no text layer)" in result.stderr and "need the model" in result.stderr
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(r["page"], r["method"], r["route"]) for r in records] == [(1, "text", "text")]
    only_scan = run_kimivl("ocr", pdf, "--pages", "2", "--method", "text", "-o", tmp_path / "none.md")
    assert only_scan.returncode == 1 and not (tmp_path / "none.md").exists()  # no empty file left behind


def test_auto_routes_each_page_and_says_why(run_kimivl, tmp_path: Path) -> None:
    pdf = _scanned_pdf(tmp_path / "scan.pdf")
    asked: list[int] = []

    def generate(messages, images):
        asked.append(1)
        return "# Scanned page"

    result = run_kimivl("ocr", pdf, "--jsonl", generate=generate)
    assert result.returncode == 0, result.stderr
    records = [json.loads(line) for line in result.stdout.splitlines()]
    assert [(r["route"], r["method"]) for r in records] == [("text", "text"), ("model", "vision")]
    assert records[0]["reason"].startswith("born-digital") and records[1]["reason"].startswith("scanned")
    assert len(asked) == 1


def test_auto_without_a_model_writes_text_pages_and_names_the_rest(run_kimivl, tmp_path: Path) -> None:
    from kimivl_cli.errors import InputError

    pdf = _scanned_pdf(tmp_path / "scan.pdf")

    def unavailable(messages, images):
        raise InputError("no weights here")

    result = run_kimivl("ocr", pdf, "--jsonl", generate=unavailable)
    assert result.returncode == 1
    assert [json.loads(line)["page"] for line in result.stdout.splitlines()] == [1]
    assert "scan.pdf p2" in result.stderr


def test_routing_reasons(tmp_path: Path, ocr_bench_dir: Path) -> None:
    def route(path: Path, page: int = 0):
        doc = PdfDocument(path)
        words = doc.words(page)
        return route_page(doc.page(page), words, None if words else doc.render(page, dpi=24))

    assert route(ocr_bench_dir / "pdfs" / "openstax_caculus_pg_273.pdf").reason.startswith("math-dense")
    assert route(ocr_bench_dir / "pdfs" / "earnings.pdf").reason.startswith("table-dense")
    assert route(ocr_bench_dir / "pdfs" / "blank_book_pg1.pdf").target == "blank"
    assert route(make_pdf(tmp_path / "prose.pdf", [PROSE])).target == "text"


def test_libtasn1_prose_never_loads_the_model(run_kimivl, libtasn1_pdf: Path) -> None:
    def no_model(messages, images):
        raise AssertionError("a prose page reached the model")

    result = run_kimivl("ocr", libtasn1_pdf, "--pages", "5-7", "--jsonl", generate=no_model)
    assert result.returncode == 0, result.stderr
    records = [json.loads(line) for line in result.stdout.splitlines()]
    assert {(r["route"], r["method"]) for r in records} == {("text", "text")}
