"""Run the real `kimivl` CLI in a subprocess, optionally with the fake model behind the OCR seam."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

FAKE_CLI = Path(__file__).with_name("fake_cli.py")
ROOT = Path(__file__).resolve().parents[2]


def kimivl_command(*args: str, fake_model: bool = False) -> list[str]:
    prefix = [sys.executable, str(FAKE_CLI)] if fake_model else [sys.executable, "-m", "kimivl_cli"]
    return [*prefix, *map(str, args)]


def kimivl(*args: object, fake_model: bool = False, env: dict | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        kimivl_command(*map(str, args), fake_model=fake_model),
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        cwd=ROOT,
    )
