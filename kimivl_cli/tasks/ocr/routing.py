"""Per-page routing for `--method auto`: the text path or the model, decided before any model loads.

Each page is classified from what is cheap to read (the text layer's words and fonts, the
images' boxes, the vector drawings; about a millisecond a page, plus a 24 dpi thumbnail when
there is no text at all):

- blank: no text and a near-uniform thumbnail -> nothing written;
- scanned: no text layer, an unreadable one (mostly replacement or private-use characters), or
  text laid over a page-sized image (a scan with an OCR layer, often wrong) -> the model;
- math-dense: many mathematical symbols or math-font glyphs -> the model (the text layer has no LaTeX);
- graphics text: pictures cover much of the page and the text layer is thin -> the model;
- table-dense: a ruled table (three or more horizontal rules of one width) -> the model;
- otherwise a born-digital page with a trustworthy text layer -> the text path.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import pymupdf
from PIL import Image

from kimivl_cli.media import Word

Target = Literal["text", "model", "blank"]

BLANK_STD = 4.0  # grey-level standard deviation (0-255) below which a page is uniform
BLANK_INK = 0.002  # share of pixels clearly darker than the background
GARBAGE_SHARE = 0.3  # share of unreadable characters from which a text layer is not trusted
SCAN_IMAGE_COVER = 0.8  # an image this share of the page under the text: a scan with an OCR layer
MATH_SHARE = 0.02  # share of characters that are math symbols or set in a math font
MATH_MIN = 12
TABLE_RULES = 3  # horizontal rules of one width (a ruled table's top, middle and bottom rules)
PICTURE_COVER = 0.35
THIN_TEXT_WORDS = 80

_MATH_CHARS = re.compile(
    r"[\u0391-\u03c9\u2200-\u22ff\u2190-\u21ff\u27c0-\u27ef\u2980-\u2aff\U0001d400-\U0001d7ff∫√∑∏∞≈≠≤≥±×÷]"
)
_MATH_FONT = re.compile(r"CMMI|CMSY|CMEX|MSBM|Math|Symbol|STIX|Cambria-?Math", re.IGNORECASE)
_NOT_MATH = re.compile(r"[\s.,;:]")
_UNREADABLE = re.compile(r"[\ufffd\ue000-\uf8ff\x00-\x08\x0e-\x1f]")


@dataclass(frozen=True)
class Route:
    target: Target
    reason: str


def is_blank(image: Image.Image) -> bool:
    """Near-uniform: tiny grey spread, or almost no pixels darker than the background. O(pixels)."""
    grey = np.asarray(image.convert("L"), dtype=np.float32)
    if grey.std() < BLANK_STD:
        return True
    background = float(np.median(grey))
    return float((grey < background - 60).mean()) < BLANK_INK


def route_image(image: Image.Image) -> Route:
    """An image input: blank, or a scan for the model."""
    return Route("blank", "blank page") if is_blank(image) else Route("model", "scanned: an image, no text layer")


def route_page(page: pymupdf.Page, words: Sequence[Word], thumbnail: Image.Image | None = None) -> Route:
    """Where one PDF page goes, and why. `thumbnail` (a low-resolution render) is needed only without words."""
    area = max(page.rect.width * page.rect.height, 1.0)
    if not words:
        if thumbnail is not None and is_blank(thumbnail):
            return Route("blank", "blank page")
        return Route("model", "scanned: no text layer")
    text = "".join(w.text for w in words)
    unreadable = len(_UNREADABLE.findall(text)) / max(len(text), 1)
    if unreadable >= GARBAGE_SHARE:
        return Route("model", f"scanned: text layer unreadable ({unreadable:.0%} garbage characters)")
    image_boxes = _image_boxes(page)
    if any(_area(box) >= SCAN_IMAGE_COVER * area for box in image_boxes):
        return Route("model", "scanned: text layer over a page-sized image (an OCR layer)")
    pictures = sum(_area(box) for box in image_boxes) / area
    if pictures >= PICTURE_COVER and len(words) < THIN_TEXT_WORDS:
        return Route("model", f"graphics text: pictures cover {pictures:.0%} of the page, {len(words)} words")
    math = _math_count(page, text)
    if math >= MATH_MIN and math >= MATH_SHARE * len(text):
        return Route("model", f"math-dense: {math} math symbols")
    rules = _table_rules(page)
    if rules >= TABLE_RULES:
        return Route("model", f"table-dense: a ruled table ({rules} rules of one width)")
    return Route("text", "born-digital: trustworthy text layer")


def _area(box: pymupdf.Rect) -> float:
    return max(box.width, 0) * max(box.height, 0)


def _image_boxes(page: pymupdf.Page) -> list[pymupdf.Rect]:
    return [pymupdf.Rect(info["bbox"]) & page.rect for info in page.get_image_info()]


def _math_count(page: pymupdf.Page, text: str) -> int:
    """Math symbols in the text plus characters set in math fonts (TeX's CMMI/CMSY, Cambria Math...)."""
    spans = [
        span
        for block in page.get_text("dict", flags=0)["blocks"]
        for line in block.get("lines", [])
        for span in line["spans"]
    ]
    # Leader dots and commas are often set in a math font (TeX's tables of contents): not math.
    in_math_fonts = sum(len(_NOT_MATH.sub("", s["text"])) for s in spans if _MATH_FONT.search(s["font"]))
    return len(_MATH_CHARS.findall(text)) + in_math_fonts


def _table_rules(page: pymupdf.Page) -> int:
    """The most horizontal rules (thin strokes at least 30 points long) that share one width."""
    extents: Counter[tuple[int, int]] = Counter()
    for path in page.get_drawings():
        for item in path["items"]:
            if item[0] == "l" and abs(item[1].y - item[2].y) < 1:
                x0, x1 = sorted((item[1].x, item[2].x))
            elif item[0] == "re" and item[1].height < 2:
                x0, x1 = item[1].x0, item[1].x1
            else:
                continue
            if x1 - x0 >= 30:
                extents[round(x0 / 2), round(x1 / 2)] += 1
    return max(extents.values(), default=0)
