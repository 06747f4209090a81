"""The OCR benchmark scorer's check types on small handmade cases."""

from __future__ import annotations

import importlib.util
from pathlib import Path

spec = importlib.util.spec_from_file_location(
    "ocr_bench", Path(__file__).resolve().parents[2] / "benchmarks" / "ocr_bench.py"
)
bench = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bench)

PAGE = """# Results

The quick brown fox jumps over the lazy dog.

| Model | Score | Size |
|---|---|---|
| A | 0.91 | 7B |
| B | 0.85 | 13B |

Euler: $e^{i \\pi} + 1 = 0$

Page 7"""


def test_present_exact_fuzzy_and_case() -> None:
    assert bench.check_present({"text": "quick brown fox"}, PAGE)
    assert not bench.check_present({"text": "quick brwn fox"}, PAGE)
    assert bench.check_present({"text": "quick brwn fox", "max_diffs": 1}, PAGE)
    assert not bench.check_present({"text": "QUICK brown"}, PAGE)
    assert bench.check_present({"text": "QUICK brown", "case_sensitive": False}, PAGE)
    assert bench.check_present({"text": "the   lazy\ndog"}, PAGE)  # whitespace normalised


def test_absent_with_last_n() -> None:
    assert bench.check_absent({"text": "Page 8"}, PAGE)
    assert not bench.check_absent({"text": "Page 7"}, PAGE)
    assert bench.check_absent({"text": "Results", "last_n": 20}, PAGE)


def test_order() -> None:
    assert bench.check_order({"before": "Results", "after": "lazy dog"}, PAGE)
    assert not bench.check_order({"before": "lazy dog", "after": "Results"}, PAGE)
    assert bench.check_order({"before": "Resu1ts", "after": "lazy dgo", "max_diffs": 2}, PAGE)


def test_table_cells_and_neighbours() -> None:
    assert bench.check_table({"cell": "0.85"}, PAGE)
    assert bench.check_table({"cell": "0.85", "up": "0.91", "left": "B", "right": "13B"}, PAGE)
    assert bench.check_table({"cell": "0.85", "top_heading": "Score", "left_heading": "B"}, PAGE)
    assert not bench.check_table({"cell": "0.85", "down": "0.91"}, PAGE)
    assert not bench.check_table({"cell": "Euler"}, PAGE)
    html = "<table><tr><th>x</th><th>y</th></tr><tr><td>1</td><td>2</td></tr></table>"
    assert bench.check_table({"cell": "2", "up": "y", "left": "1"}, html)


def test_math_normalises_spacing_and_braces() -> None:
    assert bench.check_math({"math": "e^{i \\pi}+1=0"}, PAGE)
    assert bench.check_math({"math": "a^{2}+b^{2}=c^{2}"}, "$$a^2 + b^2 = c^2$$")
    assert not bench.check_math({"math": "a^{2}+b^{2}=c^{3}"}, "$$a^2 + b^2 = c^2$$")


def test_baseline_counts_real_text_only() -> None:
    assert bench.check_baseline({"max_length": 10}, "<!-- blank page: skipped -->\n")
    assert not bench.check_baseline({"max_length": 10}, "Some words on the page")


def test_fuzzy_find_edit_distance() -> None:
    assert bench.fuzzy_find("abc", "xxabcxx") == [5]
    assert bench.fuzzy_find("abd", "xxabcxx", 1)
    assert not bench.fuzzy_find("azz", "xxabcxx", 1)
