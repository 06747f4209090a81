"""Clean a model's page transcription into plain Markdown.

Models wrap answers in chatter ("Here is the markdown:") and fences (```markdown ... ```),
leave code fences open when they stop at the token limit, and emit table rows with too few
or too many cells. `clean_markdown` fixes those and nothing else; it never raises and is
idempotent (cleaning twice gives the same text), which the property tests check.
"""

from __future__ import annotations

import re

EMPTY_PAGE_NOTE = "<!-- no text recognised on this page -->"

_PREAMBLE = re.compile(
    r"^\s*(?:sure[,!.]?\s*)?(?:here(?:'s| is| are)\b[^\n]*?(?:markdown|transcription|text|content|page|ocr)[^\n]*?[:.]"
    r"|below is\b[^\n]*?[:.])\s*(?:\n|$)",
    re.IGNORECASE,
)
_OUTER_FENCE = re.compile(r"^\s*```[ \t]*(?:markdown|md)?[ \t]*\n(?P<body>.*?)\n?```\s*$", re.DOTALL | re.IGNORECASE)
_FENCE = re.compile(r"^ {0,3}(`{3,}|~{3,})")
_MAX_ROUNDS = 16
_TABLE_RULE = re.compile(r"^\|?\s*:?-{3,}:?\s*(?:\|\s*:?-{3,}:?\s*)*\|?$")


def clean_markdown(text: str) -> str:
    """The page's Markdown without wrapper chatter, with closed fences and rectangular tables."""
    text = text.replace("\r\n", "\n").replace("\r", "\n").strip()
    for _ in range(_MAX_ROUNDS):  # each round only removes wrappers or closes one fence: converges fast
        cleaned = _one_round(text)
        if cleaned == text:
            break
        text = cleaned
    return text


def _one_round(text: str) -> str:
    text = _strip_wrappers(text)
    lines = _close_fences(text.split("\n"))
    return "\n".join(_repair_tables(lines)).strip()


def _strip_wrappers(text: str) -> str:
    text = _PREAMBLE.sub("", text, count=1).strip()
    match = _OUTER_FENCE.match(text)
    if match and not _FENCE.search(match.group("body").split("\n", 1)[0]):
        text = match.group("body").strip()
    return text


def _close_fences(lines: list[str]) -> list[str]:
    """Append the closing fence a truncated answer left open (same character, same length)."""
    open_fence: str | None = None
    for line in lines:
        match = _FENCE.match(line)
        if not match:
            continue
        fence = match.group(1)
        if open_fence is None:
            open_fence = fence
        elif fence[0] == open_fence[0] and len(fence) >= len(open_fence) and not line.strip()[len(fence) :].strip():
            open_fence = None
    return [*lines, open_fence] if open_fence else lines


def _cells(row: str) -> list[str]:
    row = row.strip()
    if row.startswith("|"):
        row = row[1:]
    if row.endswith("|") and not row.endswith("\\|"):
        row = row[:-1]
    return [cell.strip() for cell in re.split(r"(?<!\\)\|", row)]


def _repair_tables(lines: list[str]) -> list[str]:
    """Pad or merge the rows of each pipe table (header + rule + rows) to the header's width."""
    out: list[str] = []
    width = 0
    in_fence = False
    for i, line in enumerate(lines):
        if _FENCE.match(line):
            in_fence = not in_fence
        is_row = not in_fence and line.lstrip().startswith("|")
        if is_row and width == 0 and i + 1 < len(lines) and _TABLE_RULE.match(lines[i + 1].strip()):
            width = len(_cells(line))
        elif not is_row:
            width = 0
        if width and is_row:
            if _TABLE_RULE.match(line.strip()):
                cells = ["---"] * width
            else:
                cells = _cells(line)
                cells = (
                    [*cells[: width - 1], " ".join(c for c in cells[width - 1 :] if c)] if len(cells) > width else cells
                )
                cells += [""] * (width - len(cells))
            line = "| " + " | ".join(cells) + " |"
        out.append(line)
    return out
