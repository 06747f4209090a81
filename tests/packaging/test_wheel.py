"""A built wheel carries what a non-editable install needs at run time: prompts and the C kernel."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from kimivl_cli.prompts import BUNDLED_PROMPTS, load_prompt

ROOT = Path(__file__).resolve().parents[2]


def test_bundled_prompts_are_the_repository_prompts() -> None:
    names = sorted(p.name for p in (ROOT / "prompts").glob("*.md"))
    assert names and names == sorted(p.name for p in BUNDLED_PROMPTS.glob("*.md"))
    assert load_prompt("ocr.md") == (ROOT / "prompts" / "ocr.md").read_text(encoding="utf-8")


@pytest.mark.slow
def test_wheel_contains_prompts_and_kernel_source(tmp_path: Path) -> None:
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "-q",
            str(ROOT),
            "--no-deps",
            "--no-build-isolation",
            "-w",
            str(tmp_path),
        ],
        check=True,
        capture_output=True,
    )
    (wheel,) = tmp_path.glob("kimivl_cli-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for prompt in (ROOT / "prompts").glob("*.md"):
        assert f"kimivl_cli/prompt_templates/{prompt.name}" in names
    for source in (ROOT / "kimivl_cli" / "kernels").glob("*.c"):  # the native kernels build from these
        assert f"kimivl_cli/kernels/{source.name}" in names
    assert "kimivl_cli/cli/__init__.py" in names
