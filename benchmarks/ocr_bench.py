"""Score OCR Markdown against the olmOCR-Bench sample checks in ../shared/ocr-bench.

    python benchmarks/ocr_bench.py [--json] [--method text|anchor] [--bench DIR]

`anchor` scores the olmOCR pipeline's own outputs shipped with the sample; `text` runs our
`--method text` (no model) on the same PDFs. Without --method both are printed. Score = share
of checks passed per PDF, averaged over PDFs (as olmOCR-Bench reports it).

Check semantics (ours, following the sample's README):
- present / absent: fuzzy substring with at most `max_diffs` edits (Sellers' approximate matching),
  after normalising whitespace and typographic quotes/dashes; `last_n` limits `absent` to the tail.
- order: `before` matches (fuzzily) ending before some match of `after` starts.
- table: some Markdown pipe table or HTML table has a cell equal to `cell` (normalised) whose
  neighbours `up/down/left/right` match, `top_heading` is its column's first cell, `left_heading` its row's first.
- math: the formula's LaTeX, with spacing and `{}` grouping normalised, appears in the output's
  math text. Rendering both sides and comparing images (the official check) is out of reach here
  (no KaTeX/browser), so equivalent but differently spelled formulas fail: a lower bound.
- baseline: at most `max_length` alphanumeric characters in the output (blank pages).
"""

from __future__ import annotations

import argparse
import html
import json
import re
import sys
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_BENCH = ROOT.parent / "shared" / "ocr-bench"
_TRANSLATE = str.maketrans(
    {"“": '"', "”": '"', "‘": "'", "’": "'", "–": "-", "—": "-", "\u00a0": " ", "ﬁ": "fi", "ﬂ": "fl"}
)


def normalise(text: str) -> str:
    return " ".join(text.translate(_TRANSLATE).split())


def fuzzy_find(needle: str, haystack: str, max_diffs: int = 0) -> list[int]:
    """End offsets in `haystack` where `needle` matches with <= max_diffs edits. O(len(n) * len(h))."""
    if not needle:
        return [0]
    if max_diffs == 0:
        return [m.end() for m in re.finditer(re.escape(needle), haystack)]
    previous = list(range(len(needle) + 1))  # column for haystack position -1: free start anywhere
    ends = []
    for j, ch in enumerate(haystack):
        current = [0]
        for i, nch in enumerate(needle, 1):
            current.append(min(previous[i] + 1, current[i - 1] + 1, previous[i - 1] + (nch != ch)))
        if current[-1] <= max_diffs:
            ends.append(j + 1)
        previous = current
    return ends


def _starts(needle: str, haystack: str, max_diffs: int) -> list[int]:
    """Approximate start offsets: match the reversed strings."""
    return [len(haystack) - e for e in fuzzy_find(needle[::-1], haystack[::-1], max_diffs)]


def check_present(check: dict, text: str) -> bool:
    needle, hay = normalise(check["text"]), normalise(text)
    if not check.get("case_sensitive", True):
        needle, hay = needle.lower(), hay.lower()
    return bool(fuzzy_find(needle, hay, check.get("max_diffs", 0)))


def check_absent(check: dict, text: str) -> bool:
    if check.get("last_n"):
        text = text[-check["last_n"] :]
    return not check_present(check, text)


def check_order(check: dict, text: str) -> bool:
    hay, diffs = normalise(text), check.get("max_diffs", 0)
    before_ends = fuzzy_find(normalise(check["before"]), hay, diffs)
    after_starts = _starts(normalise(check["after"]), hay, diffs)
    return bool(before_ends and after_starts and min(before_ends) <= max(after_starts))


def parse_tables(text: str) -> list[list[list[str]]]:
    """Markdown pipe tables (separator rows dropped) and HTML tables (no span expansion) as cell grids."""
    tables: list[list[list[str]]] = []
    rows: list[list[str]] = []
    for line in [*text.splitlines(), ""]:
        stripped = line.strip()
        if stripped.startswith("|"):
            cells = [normalise(c) for c in re.split(r"(?<!\\)\|", stripped.strip("|"))]
            if not all(re.fullmatch(r":?-{3,}:?", c) for c in cells if c) or not any(cells):
                rows.append(cells)
        elif rows:
            tables.append(rows)
            rows = []
    for table in re.findall(r"<table.*?</table>", text, flags=re.DOTALL | re.IGNORECASE):
        grid = []
        for row in re.findall(r"<tr.*?</tr>", table, flags=re.DOTALL | re.IGNORECASE):
            cells = re.findall(r"<t[hd][^>]*>(.*?)</t[hd]>", row, flags=re.DOTALL | re.IGNORECASE)
            grid.append([normalise(html.unescape(re.sub(r"<[^>]+>", " ", c))) for c in cells])
        tables.append(grid)
    return tables


def check_table(check: dict, text: str) -> bool:
    target = normalise(check["cell"])
    for grid in parse_tables(text):
        for r, row in enumerate(grid):
            for c, cell in enumerate(row):
                if cell != target:
                    continue

                def at(rr: int, cc: int, g: list[list[str]] = grid) -> str | None:
                    return g[rr][cc] if 0 <= rr < len(g) and 0 <= cc < len(g[rr]) else None

                wanted = {
                    "up": at(r - 1, c),
                    "down": at(r + 1, c),
                    "left": at(r, c - 1),
                    "right": at(r, c + 1),
                    "top_heading": at(0, c),
                    "left_heading": at(r, 0),
                }
                if all(wanted[k] == normalise(check[k]) for k in wanted if check.get(k)):
                    return True
    return False


def normalise_latex(formula: str) -> str:
    """LaTeX with spacing commands, whitespace, `\\left`/`\\right` and redundant `{}` around one token removed."""
    formula = re.sub(r"\\[,;:! ]|\\q?quad|\\left|\\right|\s+", "", formula)
    formula = formula.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")
    previous = None
    while previous != formula:
        previous = formula
        formula = re.sub(r"([_^])\{(\\?[A-Za-z0-9])\}", r"\1\2", formula)
    return formula


def check_math(check: dict, text: str) -> bool:
    return normalise_latex(check["math"]) in normalise_latex(text)


def check_baseline(check: dict, text: str) -> bool:
    text = re.sub(r"<!--.*?-->", "", text, flags=re.DOTALL)
    return len(re.findall(r"[A-Za-z0-9]", text)) <= check.get("max_length", 0)


CHECKS = {
    "present": check_present,
    "absent": check_absent,
    "order": check_order,
    "table": check_table,
    "math": check_math,
    "baseline": check_baseline,
}


def load_checks(bench: Path) -> list[dict]:
    checks = []
    for name in ("dataset.jsonl", "blanks.jsonl"):
        checks += [json.loads(line) for line in (bench / name).read_text().splitlines() if line.strip()]
    return checks


def anchor_output(bench: Path, pdf: str, page: int) -> str:
    stem = pdf.removesuffix(".pdf")
    path = bench / "anchor_olmocr_outputs" / f"{stem}_pg{page}_repeat1.md"
    return path.read_text(encoding="utf-8") if path.exists() else ""


def text_output(bench: Path, pdf: str, page: int) -> str:
    """Our `--method text` Markdown of one page, through the task API (no model)."""
    from kimivl_cli.media import resolve_inputs
    from kimivl_cli.tasks.ocr import OcrOptions, plan_pages
    from kimivl_cli.tasks.ocr.pipeline import ocr_page

    options = OcrOptions(method="text", pages=str(page))
    (job,) = plan_pages(resolve_inputs([str(bench / "pdfs" / pdf)]), options)
    try:
        return ocr_page(job, options, generate=None).markdown
    except Exception as exc:  # a scanned page needs the model: it scores as empty output
        print(f"note: {pdf} p{page}: {exc}", file=sys.stderr)
        return ""


def score(bench: Path, output_for) -> dict:
    """Per-type pass counts and the per-PDF averaged score."""
    per_pdf: dict[str, list[bool]] = defaultdict(list)
    per_type: dict[str, list[bool]] = defaultdict(list)
    cache: dict[tuple[str, int], str] = {}
    for check in load_checks(bench):
        key = (check["pdf"], check["page"])
        if key not in cache:
            cache[key] = output_for(bench, *key)
        passed = CHECKS[check["type"]](check, cache[key])
        per_pdf[check["pdf"]].append(passed)
        per_type[check["type"]].append(passed)
    return {
        "score": sum(sum(v) / len(v) for v in per_pdf.values()) / len(per_pdf),
        "pdfs": len(per_pdf),
        "checks": sum(len(v) for v in per_type.values()),
        "by_type": {t: f"{sum(v)}/{len(v)}" for t, v in sorted(per_type.items())},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--method", choices=["text", "anchor"], help="score only this output (default: both)")
    parser.add_argument("--bench", type=Path, default=DEFAULT_BENCH, help="the ocr-bench folder")
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT))
    outputs = {"anchor": anchor_output, "text": text_output}
    results = {m: score(args.bench, outputs[m]) for m in ([args.method] if args.method else ["anchor", "text"])}
    if args.json:
        print(json.dumps(results, indent=2))
        return
    for method, r in results.items():
        types = "  ".join(f"{t} {v}" for t, v in r["by_type"].items())
        print(f"{method:7s} score {r['score']:.3f} over {r['pdfs']} PDFs / {r['checks']} checks   {types}")
    print("math checks compare normalised LaTeX text, not renderings: equivalent spellings fail (lower bound)")


if __name__ == "__main__":
    main()
