"""Markdown from a born-digital page's text layer, without the model (`--method text`).

Works on PyMuPDF's span dictionaries (font size, bold/monospace flags, boxes), which the
plain word list of `media.pdf` does not carry:

- headings: lines set larger than the body size; the distinct larger sizes of the document,
  largest first, become `#`, `##`, ... (at most four levels);
- lists: bullets (•, –, ◦, ...) become `- `; numbered items keep their numbers;
- code: runs of monospaced lines become fenced blocks, indentation kept;
- simple tables: three or more rows that each split into the same number (>= 3) of cells;
- reading order: blocks top to bottom, side-by-side columns left column first;
- headers/footers: lines in the top/bottom 8% of the page that repeat (digits ignored) on at
  least 3 sampled pages and 15% of them, and lone page numbers there, are dropped unless `keep_headers`.

Cost: one `get_text("dict")` per page (~10 ms); the document style samples at most 40 pages.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass
from itertools import groupby

import pymupdf

_BAND = 0.08  # header/footer band: this share of the page height at the top and at the bottom
_BULLET = re.compile(r"^[•◦▪‣●○■□–·∙*-]\s*")
_PAGE_NUMBER = re.compile(r"^(?:page\s*)?(?:\d{1,4}|[ivxlc]{1,6})(?:\s*(?:/|of)\s*\d{1,4})?$", re.IGNORECASE)
_STYLE_SAMPLE = 40


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


@dataclass(frozen=True)
class DocumentStyle:
    """What the whole document says about its pages: body size, heading sizes, running lines."""

    body_size: float
    heading_sizes: tuple[float, ...]  # largest first: level 1, 2, ...
    furniture: frozenset[str]  # normalised header/footer lines that repeat across pages


def page_lines(page: pymupdf.Page) -> list[Line]:
    """The text lines of a page with their dominant font size and monospace flag."""
    lines = []
    for block in page.get_text("dict", flags=pymupdf.TEXTFLAGS_TEXT)["blocks"]:
        for line in block.get("lines", []):
            spans = [s for s in line["spans"] if s["text"]]
            text = " ".join("".join(s["text"] for s in spans).split())
            if not text:
                continue
            inked = [s for s in spans if s["text"].strip()]
            weights = Counter()
            for s in inked:
                weights[round(s["size"] * 2) / 2] += len(s["text"])
            mono = all(
                s["flags"] & pymupdf.TEXT_FONT_MONOSPACED or "Mono" in s["font"] or "TT" in s["font"] for s in inked
            )
            lines.append(Line(*line["bbox"], text, weights.most_common(1)[0][0], mono, block["number"]))
    return lines


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


def is_furniture(line: Line, height: float, style: DocumentStyle) -> bool:
    """A running header/footer or a lone page number."""
    if not _in_band(line, height):
        return False
    return _normalise(line.text) in style.furniture or bool(_PAGE_NUMBER.match(line.text))


def page_markdown(page: pymupdf.Page, style: DocumentStyle, *, keep_headers: bool = False) -> str:
    """The page as Markdown (empty when it has no text layer)."""
    lines = page_lines(page)
    if not keep_headers:
        lines = [ln for ln in lines if not is_furniture(ln, page.rect.height, style)]
    if not lines:
        return ""
    tables, lines = _split_tables(lines)
    blocks = [list(group) for _, group in groupby(lines, key=lambda ln: ln.block)]
    chunks = [(b[0].y0, min(ln.x0 for ln in b), max(ln.x1 for ln in b), _block_markdown(b, style)) for b in blocks]
    chunks += [
        (t[0][0].y0, min(c.x0 for r in t for c in r), max(c.x1 for r in t for c in r), _table_markdown(t))
        for t in tables
    ]
    return _join(_reading_order(chunks))


def _reading_order(chunks: list[tuple[float, float, float, str]]) -> list[str]:
    """Top to bottom; a run of narrow blocks that sit side by side is read left column first."""
    if not chunks:
        return []
    left = min(c[1] for c in chunks)
    right = max(c[2] for c in chunks)
    mid = (left + right) / 2
    ordered: list[str] = []
    run: list[tuple[float, float, float, str]] = []

    def flush() -> None:
        two_columns = any(c[2] <= mid + 5 for c in run) and any(c[1] >= mid - 5 for c in run)
        key = (lambda c: (c[1] >= mid - 5, c[0])) if two_columns else (lambda c: c[0])
        ordered.extend(c[3] for c in sorted(run, key=key))
        run.clear()

    for chunk in sorted(chunks, key=lambda c: c[0]):
        if chunk[1] < mid - 5 and chunk[2] > mid + 5:  # spans the middle: full width
            flush()
            ordered.append(chunk[3])
        else:
            run.append(chunk)
    flush()
    return ordered


def _join(parts: list[str]) -> str:
    """Blocks joined by blank lines; adjacent code fences merge into one block."""
    text = "\n\n".join(p for p in parts if p)
    return re.sub(r"\n```\n\n```\n", "\n", text)


def _block_markdown(lines: list[Line], style: DocumentStyle) -> str:
    """A block as Markdown; its monospaced and proportional runs are formatted separately."""
    return "\n\n".join(_run_markdown(list(run), style) for _, run in groupby(lines, key=lambda ln: ln.mono))


def _run_markdown(lines: list[Line], style: DocumentStyle) -> str:
    if lines[0].mono:
        indent_unit = max(1.0, lines[0].size * 0.52)  # monospace advance is about half the font size
        left = min(ln.x0 for ln in lines)
        body = "\n".join(" " * round((ln.x0 - left) / indent_unit) + ln.text for ln in lines)
        return f"```\n{body}\n```"
    size = Counter(ln.size for ln in lines).most_common(1)[0][0]
    text = " ".join(ln.text for ln in lines)
    if size in style.heading_sizes and len(text) < 200:
        return "#" * (style.heading_sizes.index(size) + 1) + " " + text
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


def _split_tables(lines: list[Line]) -> tuple[list[list[list[Line]]], list[Line]]:
    """Pull out simple tables: >= 3 consecutive rows with the same number (>= 3) of column-aligned cells."""
    rows: list[list[Line]] = []
    for line in sorted(lines, key=lambda ln: (ln.y0 + ln.y1) / 2):
        centre = (line.y0 + line.y1) / 2
        if rows and abs(centre - (rows[-1][0].y0 + rows[-1][0].y1) / 2) < line.size * 0.4:
            rows[-1].append(line)
        else:
            rows.append([line])
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
            table = [sorted(r, key=lambda ln: ln.x0) for r in rows[i:j]]
            tables.append(table)
            in_table.update(id(c) for r in table for c in r)
        i = max(j, i + 1)
    return tables, [ln for ln in lines if id(ln) not in in_table]


def _aligned(upper: list[Line], lower: list[Line]) -> bool:
    """Each cell of a row overlaps, left to right, the same-numbered cell of the row above."""
    pairs = zip(sorted(upper, key=lambda ln: ln.x0), sorted(lower, key=lambda ln: ln.x0), strict=True)
    return all(a.x0 < b.x1 and b.x0 < a.x1 for a, b in pairs)


def _table_markdown(rows: list[list[Line]]) -> str:
    cells = [[c.text.replace("|", "\\|") for c in row] for row in rows]
    header, *body = cells
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(row) + " |" for row in body]
    return "\n".join(out)
