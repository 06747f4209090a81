"""OCR prompts (`prompts/ocr*.md` in the repository) and the olmOCR-style anchor text.

The anchor text gives the model the page's text-layer lines with their positions, so it can
copy exact strings and follow the reading order while it reads layout from the image.
"""

from __future__ import annotations

from collections.abc import Sequence
from itertools import groupby
from pathlib import Path
from typing import Protocol

from kimivl_cli.prompts import load_prompt

ANCHOR_CHARS = 6000  # ~1.5k tokens: a page's worth of text without crowding the image out


class WordLike(Protocol):
    x0: float
    y0: float
    text: str
    block: int
    line: int


def anchor_text(words: Sequence[WordLike], width: float, height: float, limit: int = ANCHOR_CHARS) -> str:
    """`Page dimensions: WxH` then one `[x y]text` line per text line, in text-layer order.

    Over `limit` characters, the lines are kept from both ends of the page (beginning and end
    matter most for order and for the last words) and the middle is marked as elided.
    """
    lines = [
        f"[{round(group[0].x0)} {round(group[0].y0)}]" + " ".join(w.text for w in group)
        for _, g in groupby(words, key=lambda w: (w.block, w.line))
        if (group := list(g))
    ]
    head = f"Page dimensions: {width:.0f}x{height:.0f}"
    if sum(len(line) + 1 for line in lines) <= limit:
        return "\n".join([head, *lines])
    kept_head, kept_tail, used = [], [], 0
    while lines and used < limit:
        line = lines.pop(0) if len(kept_head) <= len(kept_tail) else lines.pop()
        (kept_head if len(kept_head) <= len(kept_tail) else kept_tail).append(line)
        used += len(line) + 1
    return "\n".join([head, *kept_head, "[...]", *reversed(kept_tail)])


def ocr_messages(anchors: str | None, prompt_file: Path | None = None) -> list[dict]:
    """The chat for one page: the page image first, then the instruction (with anchors if any).

    A `--prompt-file` replaces both templates: its `{anchors}` placeholder receives the anchors,
    or, without one, the anchors follow the user's text.
    """
    template = load_prompt("ocr.md" if anchors is None else "ocr_anchored.md", prompt_file).strip()
    prompt = template
    if anchors is not None:
        prompt = template.replace("{anchors}", anchors) if "{anchors}" in template else f"{template}\n\n{anchors}"
    return [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
