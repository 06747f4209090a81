"""Markdown from a born-digital page's text layer, without the model (`--method text`).

PyMuPDF's layout analysis (`pymupdf.layout`, bundled ONNX models run with onnxruntime, nothing
downloaded) labels the page's regions: text, titles and section headers, list items, tables
with their row/column grid, pictures, formulas, captions, page headers and footers. On the
olmOCR-Bench sample it lifts a text-layer converter from 0.41 to 0.82 (benchmarks/ocr_bench.py);
the rules below take it further:

- running headers/footers: the regions the layout calls so, plus lines in the page's top or
  bottom margin that repeat across the document (digits ignored), rows that start or end with
  a page number, a first or last row set smaller than the body and apart from it (one-page
  files), anything on the same row as a footer, and text set diagonally (watermarks);
- tables: from the layout's grid, cells filled with the words inside them, the first row as
  header; rows of column-aligned cells the layout missed become tables too;
- reading order: recursive cuts along the widest vertical then horizontal gaps between regions,
  so each column is read top to bottom before the next, whatever the number of columns;
- text: fragments of one baseline joined, Unicode NFC with spacing accents composed onto their
  letter ("J´an" -> "Ján"), hyphenated line ends joined, drop caps joined to their word;
- headings by the document's larger font sizes, bullets as `- `, monospaced runs fenced.

Cost: one layout pass per page (ONNX, about 0.2 s on an idle core) plus one `get_text("dict")`.
"""

from __future__ import annotations

import re
import unicodedata
from collections import Counter
from dataclasses import dataclass, replace
from itertools import groupby

import numpy as np
import pymupdf
import pymupdf.layout  # activates `Page.get_layout`

_BAND = 0.12  # margin band for headers/footers: this share of the page height at the top and bottom
_BULLET = re.compile(r"^[•◦▪‣●○■□–·∙*-]\s*")
_PAGE_NUMBER = re.compile(r"^(?:page\s*)?(?:\d{1,4}|[ivxlc]{1,6})(?:\s*(?:/|of)\s*\d{1,4})?\.?$", re.IGNORECASE)
_STYLE_SAMPLE = 40
_FURNITURE_KINDS = {"page-header", "page-footer"}
_HEADING_KINDS = {"title", "section-header"}
# Spacing accents typeset as their own glyph before the letter they sit on -> combining marks.
_ACCENTS = {
    "\u00b4": "\u0301",  # acute
    "`": "\u0300",
    "\u02c6": "\u0302",  # circumflex
    "\u02dc": "\u0303",  # tilde
    "\u00a8": "\u0308",  # diaeresis
    "\u02c7": "\u030c",  # caron
    "\u02d8": "\u0306",  # breve
    "\u02d9": "\u0307",  # dot above
    "\u02da": "\u030a",  # ring above
    "\u00af": "\u0304",  # macron
    "\u02dd": "\u030b",  # double acute
}
_SPACING_ACCENT = re.compile(f"([{''.join(_ACCENTS)}])([^\\W\\d_])")


@dataclass(frozen=True)
class Line:
    x0: float
    y0: float
    x1: float
    y1: float
    text: str
    size: float
    mono: bool
    block: int
    upright: bool = True  # written left to right, not rotated


@dataclass(frozen=True)
class Region:
    """A layout region: its box, its kind, and for tables the grid's inner lines (page coordinates)."""

    x0: float
    y0: float
    x1: float
    y1: float
    kind: str
    rows: tuple[float, ...] = ()
    cols: tuple[float, ...] = ()


@dataclass(frozen=True)
class DocumentStyle:
    """What the whole document says about its pages: body size, heading sizes, running lines."""

    body_size: float
    heading_sizes: tuple[float, ...]  # largest first: level 1, 2, ...
    furniture: frozenset[str]  # normalised header/footer lines that repeat across pages


@dataclass
class Chunk:
    """A piece of the page's Markdown with its box, for reading order."""

    x0: float
    y0: float
    x1: float
    y1: float
    markdown: str


def clean_text(text: str) -> str:
    """Spacing accents composed onto the following letter, then NFC ("Min´aˇc" -> "Mináč")."""
    text = _SPACING_ACCENT.sub(lambda m: m[2] + _ACCENTS[m[1]], text)
    return unicodedata.normalize("NFC", text)


def page_lines(page: pymupdf.Page) -> list[Line]:
    """The text lines of a page with their dominant font size and monospace flag."""
    lines = []
    for block in page.get_text("dict", flags=pymupdf.TEXTFLAGS_TEXT)["blocks"]:
        for line in block.get("lines", []):
            spans = [s for s in line["spans"] if s["text"]]
            text = clean_text(" ".join("".join(s["text"] for s in spans).split()))
            if not text:
                continue
            inked = [s for s in spans if s["text"].strip()]
            weights: Counter[float] = Counter()
            for s in inked:
                weights[round(s["size"] * 2) / 2] += len(s["text"])
            mono = all(
                s["flags"] & pymupdf.TEXT_FONT_MONOSPACED or "Mono" in s["font"] or "TT" in s["font"] for s in inked
            )
            upright = abs(line["dir"][1]) < 1e-3 and line["dir"][0] > 0
            lines.append(Line(*line["bbox"], text, weights.most_common(1)[0][0], mono, block["number"], upright))
    return lines


def page_regions(page: pymupdf.Page) -> list[Region]:
    """The layout's regions of the page (PyMuPDF's layout model; its numpy warnings silenced)."""
    with np.errstate(all="ignore"):
        page.get_layout(return_raw=True)
    regions = []
    for raw in page.layout_information or []:
        x0, y0, x1, y1 = raw["group_bbox"]
        grid = raw.get("table_grid")
        rows = tuple(y0 + h for h in grid.h_lines) if grid is not None else ()
        cols = tuple(x0 + v for v in grid.v_lines) if grid is not None else ()
        regions.append(Region(x0, y0, x1, y1, raw["class_name"], rows, cols))
    page.layout_information = None
    return regions


def _normalise(text: str) -> str:
    return " ".join(re.sub(r"\d+", "#", text.lower()).split())


def _in_band(line: Line, height: float) -> bool:
    return line.y1 < height * _BAND or line.y0 > height * (1 - _BAND)


def document_style(doc: pymupdf.Document) -> DocumentStyle:
    """Body size, heading sizes and repeated header/footer lines from up to 40 evenly spaced pages."""
    step = max(1, doc.page_count // _STYLE_SAMPLE)
    sample = range(0, doc.page_count, step)
    sizes: Counter[float] = Counter()
    band_lines: Counter[str] = Counter()
    for i in sample:
        page = doc[i]
        lines = page_lines(page)
        for line in lines:
            sizes[line.size] += len(line.text)
        band_lines.update({_normalise(ln.text) for ln in lines if _in_band(ln, page.rect.height)})
    if not sizes:
        return DocumentStyle(0.0, (), frozenset())
    body = sizes.most_common(1)[0][0]
    headings = tuple(sorted((s for s in sizes if s > body * 1.12), reverse=True)[:4])
    pages = len(sample)
    # Chapter-specific running heads repeat on a few pages only: 3 pages (and 15%) is enough.
    furniture = frozenset(t for t, n in band_lines.items() if n >= max(3, 0.15 * pages))
    return DocumentStyle(body, headings, furniture)


# ---------------------------------------------------------------- lines -> regions, rows, furniture


def _overlap(line: Line, region: Region) -> float:
    w = min(line.x1, region.x1) - max(line.x0, region.x0)
    h = min(line.y1, region.y1) - max(line.y0, region.y0)
    return max(w, 0) * max(h, 0) / max((line.x1 - line.x0) * (line.y1 - line.y0), 1e-6)


def _region_of(line: Line, regions: list[Region]) -> int | None:
    best = max(range(len(regions)), key=lambda i: _overlap(line, regions[i]), default=None)
    return best if best is not None and _overlap(line, regions[best]) >= 0.5 else None


def _same_row(a: Line, b: Line) -> bool:
    centre = (b.y0 + b.y1) / 2
    return a.y0 <= centre <= a.y1 or b.y0 <= (a.y0 + a.y1) / 2 <= b.y1


def _rows(lines: list[Line]) -> list[list[Line]]:
    """Lines grouped by baseline (vertical overlap), each row left to right, rows top to bottom."""
    rows: list[list[Line]] = []
    for line in sorted(lines, key=lambda ln: (ln.y0 + ln.y1) / 2):
        if rows and _same_row(rows[-1][-1], line):
            rows[-1].append(line)
        else:
            rows.append([line])
    return [sorted(row, key=lambda ln: ln.x0) for row in rows]


def _furniture(lines: list[Line], where: list[int | None], regions: list[Region], height: float, style: DocumentStyle):
    """The ids of running header/footer lines (see the module's docstring)."""
    marked = {
        id(ln)
        for ln, r in zip(lines, where, strict=True)
        if (not ln.upright and not _axis_rotated(ln, height))
        or (r is not None and r < len(regions) and regions[r].kind in _FURNITURE_KINDS)
        or (_in_band(ln, height) and (_normalise(ln.text) in style.furniture or _PAGE_NUMBER.match(ln.text)))
    }
    rows = _rows([ln for ln in lines if ln.upright])
    for above, row, below in zip([None, *rows[:-1]], rows, [*rows[1:], None], strict=True):
        if all(_in_band(ln, height) for ln in row) and _set_apart(row, above, below, style.body_size):
            marked.update(id(ln) for ln in row)
    band_rows = [row for row in rows if all(_in_band(ln, height) for ln in row)]
    for row in band_rows:
        ends = (row[0], row[-1])
        if any(id(ln) in marked for ln in row) or (len(row) > 1 and any(_PAGE_NUMBER.match(e.text) for e in ends)):
            marked.update(id(ln) for ln in row)
    return marked


def _set_apart(row: list[Line], above: list[Line] | None, below: list[Line] | None, body: float) -> bool:
    """A margin row in a smaller size than the body, with a wide gap to the text it faces."""
    height = max(ln.y1 - ln.y0 for ln in row)
    if not body or max(ln.size for ln in row) >= body or (above is None) == (below is None):
        return False  # body-sized, or not the first or last row of the page
    gap = below[0].y0 - max(ln.y1 for ln in row) if below else min(ln.y0 for ln in row) - above[0].y1
    return gap >= 2 * height


def _axis_rotated(line: Line, height: float) -> bool:
    """Text turned 90 degrees inside the page body (a rotated table header) rather than in a margin."""
    return line.x1 - line.x0 < line.y1 - line.y0 and not _in_band(line, height) and line.y1 - line.y0 < height * 0.5


def _join_drop_caps(lines: list[Line], body: float) -> list[Line]:
    """A single large initial letter is joined to the first word of the line beside it."""
    out = list(lines)
    for cap in lines:
        if not (len(cap.text) == 1 and cap.text.isalpha() and body and cap.size >= 1.8 * body):
            continue
        beside = [
            ln for ln in out if ln is not cap and 0 <= ln.x0 - cap.x1 < 3 * body and ln.y0 < cap.y1 and ln.y1 > cap.y0
        ]
        if beside:
            first = min(beside, key=lambda ln: ln.y0)
            out[out.index(first)] = replace(first, x0=cap.x0, text=cap.text + first.text)
            out.remove(cap)
    return out


# ---------------------------------------------------------------- the page


def page_markdown(page: pymupdf.Page, style: DocumentStyle, *, keep_headers: bool = False) -> str:
    """The page as Markdown (empty when it has no text layer)."""
    lines = page_lines(page)
    if not lines:
        return ""
    regions = page_regions(page)
    where = [_region_of(ln, regions) for ln in lines]
    if not keep_headers:
        dropped = _furniture(lines, where, regions, page.rect.height, style)
        if len(dropped) == len(lines):  # a page of one short text is not all header: trust the firm signs only
            dropped = _furniture(lines, where, [], page.rect.height, style)
        kept = [(ln, r) for ln, r in zip(lines, where, strict=True) if id(ln) not in dropped]
        lines, where = [k[0] for k in kept], [k[1] for k in kept]
    chunks: list[Chunk] = []
    tabled: set[int] = set()
    for index, region in enumerate(regions):
        if region.kind == "table" and region.rows and region.cols and (table := _grid_table(page, region)):
            chunks.append(Chunk(region.x0, region.y0, region.x1, region.y1, table))
            tabled.add(index)
    lines = [ln for ln, r in zip(lines, where, strict=True) if r not in tabled]
    lines = _join_drop_caps(lines, style.body_size)
    groups: dict[tuple[str, int], list[Line]] = {}
    for ln in lines:
        r = _region_of(ln, regions)
        groups.setdefault(("region", r) if r is not None else ("block", ln.block), []).append(ln)
    for (source, key), group in groups.items():
        kind = regions[key].kind if source == "region" else "text"
        tables, rest = _split_tables(group)
        chunks += [_chunk([c for r in t for c in r], _table_markdown([[c.text for c in r] for r in t])) for t in tables]
        if rest:
            chunks.append(_chunk(rest, _region_markdown(rest, kind, style)))
    return _join([c.markdown for c in reading_order(chunks)])


def _chunk(lines: list[Line], markdown: str) -> Chunk:
    return Chunk(
        min(ln.x0 for ln in lines),
        min(ln.y0 for ln in lines),
        max(ln.x1 for ln in lines),
        max(ln.y1 for ln in lines),
        markdown,
    )


def reading_order(chunks: list[Chunk]) -> list[Chunk]:
    """Columns left to right, each top to bottom: cut at the widest vertical gap, else at a
    horizontal one, recursively (an XY cut); a region crossing every gap is read where it starts."""
    if len(chunks) <= 1:
        return chunks
    cut = _widest_gap([(c.x0, c.x1) for c in chunks], 3.0)
    if cut is not None:
        return reading_order([c for c in chunks if c.x1 <= cut]) + reading_order([c for c in chunks if c.x1 > cut])
    cut = _widest_gap([(c.y0, c.y1) for c in chunks], 0.5)
    if cut is not None:
        return reading_order([c for c in chunks if c.y1 <= cut]) + reading_order([c for c in chunks if c.y1 > cut])
    wide = max(chunks, key=lambda c: c.x1 - c.x0)
    above = [c for c in chunks if c is not wide and c.y0 < wide.y0]
    below = [c for c in chunks if c is not wide and c.y0 >= wide.y0]
    if not above and not below:
        return [wide]
    if not above:
        return [wide, *reading_order(below)]
    return [*reading_order(above), wide, *reading_order(below)]


def _widest_gap(spans: list[tuple[float, float]], minimum: float) -> float | None:
    """The middle of the widest gap (at least `minimum`) between the union of the spans."""
    best, where = minimum, None
    ordered = sorted(spans)
    reach = ordered[0][1]
    for start, end in ordered[1:]:
        if start - reach >= best:
            best, where = start - reach, (start + reach) / 2
        reach = max(reach, end)
    return where


def _join(parts: list[str]) -> str:
    """Blocks joined by blank lines; adjacent code fences merge into one block."""
    text = "\n\n".join(p for p in parts if p)
    return re.sub(r"\n```\n\n```\n", "\n", text)


def _region_markdown(lines: list[Line], kind: str, style: DocumentStyle) -> str:
    """A region's lines as Markdown: rows joined, monospaced and proportional runs apart."""
    rows = _rows(lines)
    merged = [
        replace(row[0], x1=row[-1].x1, text=" ".join(ln.text for ln in row), mono=all(ln.mono for ln in row))
        for row in rows
    ]
    return "\n\n".join(_run_markdown(list(run), kind, style) for _, run in groupby(merged, key=lambda ln: ln.mono))


def _run_markdown(lines: list[Line], kind: str, style: DocumentStyle) -> str:
    if lines[0].mono:
        indent_unit = max(1.0, lines[0].size * 0.52)  # monospace advance is about half the font size
        left = min(ln.x0 for ln in lines)
        body = "\n".join(" " * round((ln.x0 - left) / indent_unit) + ln.text for ln in lines)
        return f"```\n{body}\n```"
    size = Counter(ln.size for ln in lines).most_common(1)[0][0]
    text = " ".join(ln.text for ln in lines)
    if len(text) < 200 and (size in style.heading_sizes or kind in _HEADING_KINDS):
        level = style.heading_sizes.index(size) + 1 if size in style.heading_sizes else 1 if kind == "title" else 2
        return "#" * level + " " + _escape_start(text)
    items: list[str] = []
    for line in lines:
        bullet = _BULLET.match(line.text)
        if bullet and len(line.text) > bullet.end():
            items.append("- " + line.text[bullet.end() :])
        elif re.match(r"^\d{1,3}[.)]\s", line.text) or not items:
            items.append(_escape_start(line.text))
        elif items[-1].endswith("-") and re.match(r"[a-z]", line.text) and re.search(r"\w-$", items[-1]):
            items[-1] = items[-1][:-1] + line.text  # hyphenated at the line end: join the word
        else:
            items[-1] += " " + line.text
    return "\n".join(items)


def _escape_start(text: str) -> str:
    """Keep a paragraph that starts with '#', '>' or '|' from turning into markup."""
    return "\\" + text if text[:1] in "#>|" else text


# ---------------------------------------------------------------- tables


def _grid_table(page: pymupdf.Page, region: Region) -> str:
    """The layout's table grid filled with the words whose centres fall in each cell."""
    ys = (region.y0, *region.rows, region.y1)
    xs = (region.x0, *region.cols, region.x1)
    cells = [[[] for _ in xs[1:]] for _ in ys[1:]]
    for x0, y0, x1, y1, word, *_ in page.get_text(
        "words", clip=pymupdf.Rect(region.x0, region.y0, region.x1, region.y1)
    ):
        cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
        r = sum(cy > y for y in ys[1:-1])
        c = sum(cx > x for x in xs[1:-1])
        cells[r][c].append(clean_text(word))
    grid = [[" ".join(cell) for cell in row] for row in cells]
    grid = [row for row in grid if any(row)]
    keep = [c for c in range(len(xs) - 1) if any(row[c] for row in grid)]
    grid = [[row[c] for c in keep] for row in grid]
    if len(grid) < 2 or len(keep) < 2:
        return ""
    return _table_markdown(grid)


def _split_tables(lines: list[Line]) -> tuple[list[list[list[Line]]], list[Line]]:
    """Pull out simple tables: >= 3 consecutive rows with the same number (>= 3) of column-aligned cells."""
    rows = _rows(lines)
    tables: list[list[list[Line]]] = []
    in_table: set[int] = set()
    i = 0
    while i < len(rows):
        width = len(rows[i])
        j = i
        while j < len(rows) and len(rows[j]) == width and (j == i or _aligned(rows[j - 1], rows[j])):
            j += 1
        # Widely spaced justified text splits into "cells" too, but within one block; table rows span blocks.
        if width >= 3 and j - i >= 3 and len({c.block for r in rows[i:j] for c in r}) > 1:
            tables.append(rows[i:j])
            in_table.update(id(c) for r in rows[i:j] for c in r)
        i = max(j, i + 1)
    return tables, [ln for ln in lines if id(ln) not in in_table]


def _aligned(upper: list[Line], lower: list[Line]) -> bool:
    """Each cell of a row overlaps, left to right, the same-numbered cell of the row above."""
    return all(a.x0 < b.x1 and b.x0 < a.x1 for a, b in zip(upper, lower, strict=True))


def _table_markdown(rows: list[list[str]]) -> str:
    cells = [[c.replace("|", "\\|") for c in row] for row in rows]
    header, *body = cells
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(row) + " |" for row in body]
    return "\n".join(out)
