"""Hub repo ids as `--model` takes them, told apart from paths without importing the model code."""

from __future__ import annotations

import re

_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def is_repo_id(text: str) -> bool:
    """`owner/name` as the Hub spells repo ids (`./x` or `/a/b` are paths, not ids)."""
    return _REPO_ID.match(text) is not None
