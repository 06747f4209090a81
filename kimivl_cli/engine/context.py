"""Context guard: does a prompt fit, and if not, what did each input cost?

A user who attaches a 300-page PDF needs to know which input blew the budget, so the error lists
the text tokens and each image's tokens (largest first when there are many) rather than one total.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from kimivl_cli.errors import InputError

MAX_LISTED_IMAGES = 8


@dataclass(frozen=True)
class ContextPlan:
    """Token accounting of one request: the prompt, and room left for new tokens."""

    text_tokens: int
    image_tokens: tuple[int, ...]
    limit: int
    max_new_tokens: int

    @property
    def prompt_tokens(self) -> int:
        return self.text_tokens + sum(self.image_tokens)

    @property
    def cache_len(self) -> int:
        """Slots to preallocate: the prompt plus every token that may still be generated."""
        return self.prompt_tokens + self.max_new_tokens


def describe_costs(text_tokens: int, image_tokens: Sequence[int]) -> str:
    """'text 120 tokens, image 1 1,080, image 2 256' (the biggest images when there are many)."""
    parts = [f"text {text_tokens:,} tokens"]
    ranked = sorted(range(len(image_tokens)), key=lambda i: -image_tokens[i])
    shown = sorted(ranked[:MAX_LISTED_IMAGES])
    parts += [f"image {i + 1} {image_tokens[i]:,}" for i in shown]
    if len(image_tokens) > len(shown):
        rest = sum(image_tokens[i] for i in ranked[MAX_LISTED_IMAGES:])
        parts.append(f"{len(image_tokens) - len(shown)} more images {rest:,}")
    return ", ".join(parts)


def plan_context(
    text_tokens: int,
    image_tokens: Sequence[int],
    max_new_tokens: int,
    model_context: int,
    max_context: int | None = None,
) -> ContextPlan:
    """Check the prompt against the context and cap the new tokens to what is left.

    The limit is the model's `max_position_embeddings`, or the user's `max_context` if smaller.
    The prompt must leave room for at least one new token.
    """
    if max_new_tokens < 1:
        raise InputError(f"max new tokens must be at least 1, got {max_new_tokens}")
    if max_context is not None and max_context < 1:
        raise InputError(f"max context must be at least 1 token, got {max_context}")
    limit = model_context if max_context is None else min(max_context, model_context)
    plan = ContextPlan(text_tokens, tuple(image_tokens), limit, max_new_tokens)
    if plan.prompt_tokens >= limit:
        source = "the model's context" if max_context is None or max_context >= model_context else "`max_context`"
        raise InputError(
            f"the prompt needs {plan.prompt_tokens:,} tokens ({describe_costs(text_tokens, image_tokens)}) "
            f"but {source} is {limit:,} tokens",
            "use fewer or smaller images (fewer PDF pages), shorten the text, or raise `max_context`",
        )
    return ContextPlan(text_tokens, tuple(image_tokens), limit, min(max_new_tokens, limit - plan.prompt_tokens))
