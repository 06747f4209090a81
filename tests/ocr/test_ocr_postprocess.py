"""Post-processing of model answers: examples, then never-raises and idempotence on any text."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from kimivl_cli.tasks.ocr.postprocess import clean_markdown

PIECES = [*"ab |-`~#\n:*", "```", "```markdown\n", "| --- |", "Here is the markdown:\n"]
MARKDOWNISH = st.lists(st.sampled_from(PIECES), max_size=60).map("".join)


def test_strips_chatter_and_outer_fence() -> None:
    assert clean_markdown("Here is the markdown:\n```markdown\n# Title\ntext\n```") == "# Title\ntext"
    assert clean_markdown("Sure! Here's the transcription of the page:\n\nHello") == "Hello"


def test_closes_a_truncated_code_fence() -> None:
    assert clean_markdown("intro\n```python\nx = 1") == "intro\n```python\nx = 1\n```"


def test_pads_and_merges_table_rows_to_the_header_width() -> None:
    fixed = clean_markdown("| a | b | c |\n|---|---|\n| 1 |\n| 1 | 2 | 3 | 4 |")
    assert fixed.splitlines() == ["| a | b | c |", "| --- | --- | --- |", "| 1 |  |  |", "| 1 | 2 | 3 4 |"]


def test_keeps_inner_code_blocks() -> None:
    text = "Run:\n\n```\nmake\n```\n\nDone."
    assert clean_markdown(text) == text


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.text(max_size=300), MARKDOWNISH))
def test_never_raises_and_is_idempotent(text: str) -> None:
    once = clean_markdown(text)
    assert clean_markdown(once) == once
