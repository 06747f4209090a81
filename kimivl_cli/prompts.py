"""Prompt templates live as Markdown files in the repository's `prompts/` folder.

The package reaches them through `kimivl_cli/prompt_templates` (a link to `prompts/`, copied
into wheels as package data). Users override one with `--prompt-file` (per command) or point
`KIMIVL_PROMPTS` at a folder of their own. Lookup order: `KIMIVL_PROMPTS`, then the bundled ones.
"""

from __future__ import annotations

import os
from pathlib import Path

from kimivl_cli.errors import InputError, RuntimeFailure

BUNDLED_PROMPTS = Path(__file__).resolve().parent / "prompt_templates"


def prompts_dir() -> Path:
    return Path(os.environ.get("KIMIVL_PROMPTS") or BUNDLED_PROMPTS)


def load_prompt(name: str, override: str | Path | None = None) -> str:
    """The text of prompt `name` (e.g. "ocr.md"), or of the user's `override` file."""
    if override is not None:
        try:
            return Path(override).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise InputError(f"cannot read prompt file {override}: {exc}", "pass a readable UTF-8 text file") from None
    path = prompts_dir() / name
    try:
        return path.read_text(encoding="utf-8")
    except OSError:
        raise RuntimeFailure(f"prompt template {path} is missing", "reinstall kimivl or set KIMIVL_PROMPTS") from None
