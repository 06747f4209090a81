"""PDFs: a real 36-page manual, generated encrypted/broken ones, and the page-range parser."""

from __future__ import annotations

import io
from pathlib import Path

import pymupdf
import pytest
from hypothesis import given
from hypothesis import strategies as st
from PIL import Image

from kimivl_cli.errors import InputError
from kimivl_cli.media import PdfDocument, parse_page_range
from tests.media.conftest import error_line


@pytest.fixture(scope="module")
def manual(libtasn1_pdf: Path):
    with PdfDocument(libtasn1_pdf) as doc:
        yield doc


def test_page_count_and_sizes(manual: PdfDocument) -> None:
    assert manual.page_count == 36 and not manual.repaired
    assert manual.page_size(0) == (612, 792)  # US Letter, in points


@pytest.mark.parametrize(
    ("options", "size"),
    [
        ({}, (1224, 1584)),
        ({"dpi": 72}, (612, 792)),
        ({"max_side": 500}, (387, 500)),
        ({"dpi": 72, "max_side": 396}, (306, 396)),
    ],
)
def test_render_sizes(manual: PdfDocument, options: dict, size: tuple[int, int]) -> None:
    image = manual.render(3, **options)
    assert image.mode == "RGB" and image.size == size == manual.render_size(3, **options)


def test_render_shows_ink_on_white(manual: PdfDocument) -> None:
    darkest, lightest = manual.render(0, dpi=50).convert("L").getextrema()
    assert lightest == 255 and darkest < 64


def test_words_with_boxes_and_font_sizes(manual: PdfDocument) -> None:
    words = manual.words(0)
    title = words[0]
    assert title.text == "Libtasn1" and (title.block, title.line, title.word) == (0, 0, 0)
    assert title.x0 < title.x1 <= 612 and title.y0 < title.y1 <= 792
    body = [w for w in words if w.size and w.size < title.size]
    assert title.size > 15 and body and all(8 < w.size < 15 for w in body)
    assert all(w.size > 0 for p in range(manual.page_count) for w in manual.words(p))
    assert "Libtasn1" in manual.text(0)


def test_pages_out_of_range(manual: PdfDocument) -> None:
    for page in (-1, 36):
        assert error_line(manual.render, page).endswith(f"there is no page {page + 1} (pages are 1-36)")


def test_render_refuses_giant_bitmaps(manual: PdfDocument) -> None:
    with pytest.raises(InputError, match="over the limit"):
        manual.render(0, dpi=1200, max_pixels=10_000_000)


def make_pdf(**save_options) -> bytes:
    doc = pymupdf.open()
    page = doc.new_page(width=200, height=100)
    page.insert_text((20, 50), "hello there", fontsize=12)
    picture = io.BytesIO()
    Image.new("CMYK", (30, 10), (0, 255, 255, 0)).save(picture, "JPEG")
    page.insert_image(pymupdf.Rect(100, 10, 190, 40), stream=picture.getvalue())
    return doc.tobytes(**save_options)


def test_embedded_images_come_out_rgb() -> None:
    with PdfDocument(make_pdf()) as doc:
        (found,) = doc.images(0)
    assert found.image.mode == "RGB" and found.image.size == (30, 10)
    assert found.bbox == (100, 10, 190, 40)
    red = found.image.getpixel((15, 5))
    assert red[0] > 200 and red[1] < 60 and red[2] < 60


def test_encrypted() -> None:
    data = make_pdf(encryption=pymupdf.PDF_ENCRYPT_AES_256, owner_pw="owner", user_pw="sesame")
    assert "is encrypted (pass its password with --password)" in error_line(PdfDocument, data)
    with pytest.raises(InputError, match="wrong password"):
        PdfDocument(data, password="nope")
    with PdfDocument(data, password="sesame") as doc:
        assert [w.text for w in doc.words(0)] == ["hello", "there"]


@pytest.mark.parametrize("cut", [0.5, 0.02])
def test_truncated(libtasn1_pdf: Path, cut: float) -> None:
    data = libtasn1_pdf.read_bytes()
    assert "no readable pages (empty, truncated or corrupt PDF)" in error_line(
        PdfDocument, data[: int(len(data) * cut)]
    )


def test_empty_file(tmp_path: Path) -> None:
    (tmp_path / "empty.pdf").write_bytes(b"")
    assert error_line(PdfDocument, tmp_path / "empty.pdf").endswith("empty.pdf is empty (0 bytes)")


def test_header_only_and_not_a_pdf(media_dir: Path) -> None:
    with pytest.raises(InputError, match="not a readable PDF"):
        PdfDocument(b"%PDF-1.4\n%%EOF\n")
    with pytest.raises(InputError, match=r"one\.png is an image, not a PDF"):
        PdfDocument(media_dir / "one.png")


@pytest.mark.parametrize(
    ("spec", "pages"),
    [
        ("1-3,7,10-", [0, 1, 2, 6, 9, 10, 11]),
        ("5", [4]),
        ("-2", [0, 1]),
        (" 3 - 4 , 1 ", [0, 2, 3]),
        ("2,2,1-2", [0, 1]),
        ("12-", [11]),
    ],
)
def test_page_ranges(spec: str, pages: list[int]) -> None:
    assert parse_page_range(spec, 12) == pages


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("", "bad page range"),
        ("1-3,,5", "bad page range"),
        ("a", "bad page range"),
        ("1 3", "bad page range"),
        ("-", "bad page range"),
        ("0", "valid pages are 1-12"),
        ("13", "valid pages are 1-12"),
        ("5-3", "5 comes after 3"),
        ("11-13", "outside the document"),
    ],
)
def test_bad_page_ranges(spec: str, message: str) -> None:
    assert message in error_line(parse_page_range, spec, 12)


@given(st.lists(st.tuples(st.integers(1, 40), st.integers(0, 5)), min_size=1, max_size=6), st.integers(1, 40))
def test_page_ranges_property(parts: list[tuple[int, int]], count: int) -> None:
    """Any list of ranges parses to exactly the union of its pages, or fails naming the valid range."""
    spec = ",".join(f"{a}-{a + n}" if n else f"{a}" for a, n in parts)
    expected = sorted({p - 1 for a, n in parts for p in range(a, a + n + 1)})
    if all(a + n <= count for a, n in parts):
        assert parse_page_range(spec, count) == expected
    else:
        line = error_line(parse_page_range, spec, count)
        assert f"valid pages are 1-{count}" in line or "the document has 1 page" in line
