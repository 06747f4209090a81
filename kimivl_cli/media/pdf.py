"""PDF documents (PyMuPDF): page images, the text layer with word boxes, embedded images.

Coordinates are PDF points (1/72 inch) in PyMuPDF's page space: origin top-left, y down,
page rotation applied, so boxes line up with `render()` at `scale = dpi / 72`.

Importing this module turns off MuPDF's own printing of errors and warnings to stderr: a
repaired or broken file must not spill lines into our one-line error contract. Every
MuPDF failure surfaces as an `InputError` instead.
"""

from __future__ import annotations

import re
from typing import NamedTuple

import pymupdf
from PIL import Image

from kimivl_cli.errors import InputError
from kimivl_cli.media.images import DEFAULT_MAX_PIXELS
from kimivl_cli.media.inputs import Source, as_input
from kimivl_cli.media.sniff import MediaKind

pymupdf.TOOLS.mupdf_display_errors(False)
pymupdf.TOOLS.mupdf_display_warnings(False)

DEFAULT_DPI = 144.0
"""Render resolution when neither `dpi` nor `max_side` is given: a Letter page is 1224x1584."""


class Word(NamedTuple):
    """One word of the text layer, in points. `block`/`line`/`word` number it in reading order
    within the page (MuPDF's blocks), `size` is the font size of the span it starts in."""

    x0: float
    y0: float
    x1: float
    y1: float
    text: str
    block: int
    line: int
    word: int
    size: float = 0.0


class PdfImage(NamedTuple):
    """An image embedded in a page: its object number, where it is drawn (points), its pixels."""

    xref: int
    bbox: tuple[float, float, float, float] | None
    image: Image.Image


class PdfDocument:
    """An open PDF. Use as a context manager, or call `close()`.

    Opening parses the cross-reference table only (a few ms); pages are read on demand.
    Broken cross-references are repaired by MuPDF where possible; a file with no readable
    page (truncated, corrupt, empty) or an encrypted one without the right password is an
    InputError.
    """

    def __init__(self, source: Source, password: str | None = None) -> None:
        item = as_input(source)
        self.name = item.name
        if item.kind is not MediaKind.PDF:
            raise InputError(f"{item.name} is {item.describe()}, not a PDF")
        try:
            if item.path is not None:
                self.doc = pymupdf.open(item.path, filetype="pdf")
            else:
                self.doc = pymupdf.open(stream=item.data, filetype="pdf")
        except pymupdf.EmptyFileError:
            raise InputError(f"{item.name} is empty (0 bytes)") from None
        except Exception as exc:
            raise InputError(f"{item.name}: not a readable PDF ({_reason(exc)})", "is it truncated?") from None
        try:
            self.doc.page_count  # noqa: B018  counting walks the page tree: a cycle in it fails here, once
        except Exception as exc:
            self.close()
            raise InputError(
                f"{item.name}: broken page tree ({_reason(exc)})", "re-save the PDF with a PDF tool"
            ) from None
        if self.doc.needs_pass:
            if not password:
                self.close()
                raise InputError(f"{item.name} is encrypted", "pass its password with `password`")
            if not self.doc.authenticate(password):
                self.close()
                raise InputError(f"wrong password for {item.name}")
        if self.doc.page_count == 0:
            self.close()
            raise InputError(f"{item.name}: no readable pages (empty, truncated or corrupt PDF)")
        self.page_count: int = self.doc.page_count
        self.repaired: bool = bool(getattr(self.doc, "is_repaired", False))

    def __enter__(self) -> PdfDocument:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.doc.close()

    def page(self, index: int) -> pymupdf.Page:
        """The PyMuPDF page (0-based), for callers that need more than this class offers."""
        if not 0 <= index < self.doc.page_count:  # negative indexes on an empty doc loop forever in PyMuPDF
            raise InputError(f"{self.name}: there is no page {index + 1}", f"pages are 1-{self.doc.page_count}")
        try:
            return self.doc[index]
        except Exception as exc:  # a damaged page object (MuPDF's errors have many types)
            raise InputError(f"{self.name} page {index + 1}: unreadable ({_reason(exc)})") from None

    def page_size(self, index: int) -> tuple[float, float]:
        """(width, height) in points, rotation applied."""
        rect = self.page(index).rect
        return rect.width, rect.height

    def render_size(self, index: int, *, dpi: float | None = None, max_side: int | None = None) -> tuple[int, int]:
        """The pixel size `render` would produce, without rendering."""
        rect = self.page(index).rect
        zoom = _zoom(rect.width, rect.height, dpi, max_side)
        pixels = (rect * pymupdf.Matrix(zoom, zoom)).irect  # MuPDF's own rounding of the pixmap box
        return pixels.width, pixels.height

    def render(
        self,
        page: int,
        *,
        dpi: float | None = None,
        max_side: int | None = None,
        max_pixels: int = DEFAULT_MAX_PIXELS,
    ) -> Image.Image:
        """Page `page` (0-based) as an RGB image on white: at `dpi`, or with its longest side
        `max_side` pixels, or within both if both are given; `DEFAULT_DPI` if neither.
        Cost: proportional to the pixel count (docs/performance.md)."""
        p = self.page(page)
        zoom = _zoom(p.rect.width, p.rect.height, dpi, max_side)
        width, height = self.render_size(page, dpi=dpi, max_side=max_side)
        if width * height > max_pixels:
            raise InputError(
                f"{self.name} page {page + 1} would render at {width}x{height} pixels, over the limit",
                "use a lower `dpi` or `max_side`",
            )
        try:
            pix = p.get_pixmap(matrix=pymupdf.Matrix(zoom, zoom), alpha=False, colorspace=pymupdf.csRGB)
        except Exception as exc:
            raise InputError(f"{self.name} page {page + 1} cannot be rendered ({_reason(exc)})") from None
        return Image.frombytes("RGB", (pix.width, pix.height), pix.samples)

    def words(self, page: int) -> list[Word]:
        """The text layer's words with boxes, in MuPDF's reading order; empty for a scanned page.
        Font sizes come from the same text extraction (one extra pass over the spans, ~ms)."""
        p = self.page(page)
        try:
            textpage = p.get_textpage()
            raw = p.get_text("words", textpage=textpage)
            blocks = p.get_text("dict", textpage=textpage)["blocks"]
        except Exception as exc:
            raise InputError(f"{self.name} page {page + 1}: unreadable text layer ({_reason(exc)})") from None
        lines = {
            (block["number"], n): line["spans"]
            for block in blocks
            if block.get("type") == 0
            for n, line in enumerate(block["lines"])
        }
        return [
            Word(x0, y0, x1, y1, text, b, ln, w, _span_size(lines.get((b, ln), ()), (x0 + x1) / 2))
            for x0, y0, x1, y1, text, b, ln, w in raw
        ]

    def text(self, page: int) -> str:
        """The page's text layer as plain text, in MuPDF's reading order."""
        try:
            return self.page(page).get_text("text")
        except InputError:
            raise
        except Exception as exc:
            raise InputError(f"{self.name} page {page + 1}: unreadable text layer ({_reason(exc)})") from None

    def images(self, page: int, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> list[PdfImage]:
        """The images drawn on a page, each once, as RGB (CMYK and grey converted, soft masks
        ignored like `load_images` ignores alpha), with the box of their first placement."""
        p = self.page(page)
        found = []
        for info in p.get_images(full=True):
            xref, width, height = info[0], info[2], info[3]
            if width * height > max_pixels:
                raise InputError(f"{self.name} page {page + 1}: embedded image {width}x{height} is over the limit")
            try:
                pix = pymupdf.Pixmap(self.doc, xref)
                if pix.colorspace is None:
                    continue  # a stencil mask: no colours of its own
                if pix.alpha:
                    pix = pymupdf.Pixmap(pix, 0)  # alpha dropped
                if pix.colorspace.n != 3:
                    pix = pymupdf.Pixmap(pymupdf.csRGB, pix)  # grey, CMYK, indexed -> RGB
                rects = p.get_image_rects(xref)
            except Exception as exc:
                raise InputError(f"{self.name} page {page + 1}: unreadable image ({_reason(exc)})") from None
            image = Image.frombytes("RGB", (pix.width, pix.height), pix.samples)
            bbox = tuple(rects[0]) if rects else None
            found.append(PdfImage(xref, bbox, image))  # type: ignore[arg-type]
        return found


def parse_page_range(spec: str, page_count: int) -> list[int]:
    """'1-3,7,10-' (1-based, inclusive; '10-' to the end, '-3' from the start) -> sorted unique
    0-based page indexes. Anything malformed or outside 1..page_count is an InputError."""
    valid = f"valid pages are 1-{page_count}" if page_count > 1 else "the document has 1 page"
    pages: set[int] = set()
    for part in spec.split(","):
        match = re.fullmatch(r"\s*(\d+)?\s*(-)?\s*(\d+)?\s*", part)
        if not match or not (match[1] or match[3]) or (match[1] and match[3] and not match[2]):
            raise InputError(f"bad page range {spec!r}", f"use a form like 1-3,7,10- ({valid})")
        first = int(match[1]) if match[1] else 1
        last = (int(match[3]) if match[3] else page_count) if match[2] else first
        if first > last:
            raise InputError(f"bad page range {spec!r}: {first} comes after {last}", valid)
        if first < 1 or last > page_count:
            raise InputError(f"page range {spec!r} is outside the document", valid)
        pages.update(range(first - 1, last))
    return sorted(pages)


def _zoom(width: float, height: float, dpi: float | None, max_side: int | None) -> float:
    if (dpi is not None and dpi <= 0) or (max_side is not None and max_side <= 0):
        raise InputError("the render size must be positive", "check `dpi` / `max_side`")
    zooms = [dpi / 72] if dpi else []
    if max_side:
        zooms.append(max_side / max(width, height, 1e-6))
    return min(zooms) if zooms else DEFAULT_DPI / 72


def _span_size(spans: list[dict] | tuple, x: float) -> float:
    for span in spans:
        if span["bbox"][0] - 0.5 <= x <= span["bbox"][2] + 0.5:
            return round(span["size"], 2)
    return round(spans[0]["size"], 2) if spans else 0.0


def _reason(exc: Exception) -> str:
    return str(exc).split("\n")[0].strip() or type(exc).__name__
