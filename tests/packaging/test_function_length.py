"""No function outside `kernels/` runs over 50 lines: past a screen, it wants helpers or a table.

The body is counted (docstring included, signature not); kernels are exempt because a Triton or
native kernel is one unit of scheduling, not of reading.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "kimivl_cli"
MAX_BODY_LINES = 50
EXCEPTIONS: dict[str, str] = {}
"""`path:function` -> why it may be longer (the goal is none)."""


def long_functions() -> dict[str, int]:
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        if "kernels" in path.relative_to(PACKAGE).parts:
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.body[-1].end_lineno - node.body[0].lineno + 1
                if lines > MAX_BODY_LINES:
                    found[f"{path.relative_to(PACKAGE.parent)}:{node.name}"] = lines
    return found


def test_no_function_outside_kernels_is_over_50_lines() -> None:
    too_long = {name: lines for name, lines in long_functions().items() if name not in EXCEPTIONS}
    assert not too_long, f"functions over {MAX_BODY_LINES} lines (split them, or list why in EXCEPTIONS): {too_long}"


def test_every_exception_is_still_needed() -> None:
    assert set(EXCEPTIONS) <= set(long_functions())
