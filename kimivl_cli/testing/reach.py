"""Symbols defined in `kimivl_cli/` that only tests and benchmarks use: they belong in
`kimivl_cli/testing/` (or nowhere). Run by `tests/packaging/test_reach.py`.

A symbol is a module-level function, class or constant, or a method, outside `testing/`. It is
used when package code outside `testing/` names it (a name, an attribute, an import, a word in a
string that is not a docstring: `getattr` probes and lazy export tables) or pyproject.toml does.
"""

from __future__ import annotations

import ast
import re
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

FRAMEWORK_HOOKS = frozenset({"forward", "extra_repr", "emit", "log_message", "do_GET", "do_POST", "process_request"})
"""Methods that torch, logging and http.server (socketserver) call by name."""

KERNEL_REFERENCES = re.compile(r"_reference$")
"""`kernels/`: each kernel keeps its plain PyTorch reference beside it (the developers' guide)."""

_WORD = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def _sources(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*.py") if "__pycache__" not in p.parts)


def _docstrings(tree: ast.Module) -> set[int]:
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                out.add(id(first.value))
    return out


def _names_used(tree: ast.Module) -> Counter[str]:
    docs, used = _docstrings(tree), Counter()
    for node in ast.walk(tree):
        if isinstance(node, ast.Name):
            used[node.id] += 1
        elif isinstance(node, ast.Attribute):
            used[node.attr] += 1
        elif isinstance(node, ast.alias):
            used[node.name.rsplit(".", 1)[-1]] += 1
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docs:
            used.update(_WORD.findall(node.value))
    return used


def _definitions(tree: ast.Module) -> Iterator[tuple[str, int]]:
    plain = {"property", "staticmethod", "classmethod", "cached_property"}
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            decorated = any(not (isinstance(d, ast.Name) and d.id in plain) for d in node.decorator_list)
            if not decorated or isinstance(node, ast.ClassDef):
                yield node.name, node.lineno
            if isinstance(node, ast.ClassDef):
                for item in node.body:
                    if isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef)):
                        yield item.name, item.lineno
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            for target in node.targets if isinstance(node, ast.Assign) else [node.target]:
                if isinstance(target, ast.Name):
                    yield target.id, node.lineno


def _exempt(name: str, path: Path) -> bool:
    return (
        name.startswith("__")
        or name in FRAMEWORK_HOOKS
        or ("kernels" in path.parts and KERNEL_REFERENCES.search(name) is not None)
    )


def unreached(root: Path) -> list[str]:
    """`path:line: name` for each symbol of `root/kimivl_cli` (outside `testing/`) that no package
    code uses, whether tests or benchmarks do or nothing does."""
    package, testing = root / "kimivl_cli", root / "kimivl_cli" / "testing"
    trees = {p: ast.parse(p.read_text(encoding="utf-8")) for p in _sources(package) if testing not in p.parents}
    used = sum((_names_used(tree) for tree in trees.values()), Counter())
    used.update(_WORD.findall((root / "pyproject.toml").read_text(encoding="utf-8")))
    return [
        f"{path.relative_to(root)}:{line}: {name}"
        for path, tree in trees.items()
        for name, line in _definitions(tree)
        if not used[name] and not _exempt(name, path)
    ]
