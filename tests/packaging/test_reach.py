"""No code outside `kimivl_cli/testing/` that only tests or benchmarks reach."""

from __future__ import annotations

from pathlib import Path

from kimivl_cli.testing.reach import unreached

ROOT = Path(__file__).resolve().parents[2]


def test_package_code_is_reached_from_the_package() -> None:
    assert unreached(ROOT) == []


def test_the_scan_finds_a_test_only_function(tmp_path: Path) -> None:
    package = tmp_path / "kimivl_cli"
    (package / "testing").mkdir(parents=True)
    (tmp_path / "pyproject.toml").write_text('[project.scripts]\nkimivl = "kimivl_cli.cli:main"\n')
    (package / "cli.py").write_text('"""used_only_in_docs"""\n\ndef main():\n    helper(Box)\n\ndef helper(): ...\n')
    (package / "tool.py").write_text("def used_only_in_docs():\n    pass\n\nclass Box:\n    def forward(self): ...\n")
    (package / "testing" / "twin.py").write_text("from kimivl_cli.tool import used_only_in_docs\n")
    assert unreached(tmp_path) == ["kimivl_cli/tool.py:1: used_only_in_docs"]
