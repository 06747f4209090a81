"""The reference processor's prompt text, for checking `processor.chat` against its renderings."""

from __future__ import annotations

from collections.abc import Sequence

from kimivl_cli.errors import InputError
from kimivl_cli.processor.chat import MEDIA_PAD, Message, template_parts


def render_chat(messages: Sequence[Message], add_generation_prompt: bool = True) -> str:
    """The official template's string, one `<|media_pad|>` per image (before expansion)."""
    return "".join(text for text, _ in template_parts(messages, add_generation_prompt))


def expand_media_text(text: str, tokens_per_image: Sequence[int]) -> str:
    """Replace the i-th `<|media_pad|>` with tokens_per_image[i] copies (the reference processor's text)."""
    pieces = text.split(MEDIA_PAD)
    if len(pieces) - 1 != len(tokens_per_image):
        raise InputError(f"{len(pieces) - 1} image placeholders but {len(tokens_per_image)} images")
    out = [pieces[0]]
    for n, piece in zip(tokens_per_image, pieces[1:], strict=True):
        out += [MEDIA_PAD * n, piece]
    return "".join(out)
