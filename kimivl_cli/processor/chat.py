"""Chat template: messages -> prompt text -> token ids with one `<|media_pad|>` run per image.

Renders exactly what the official Kimi-VL jinja template renders (no newlines between turns):

    <|im_system|>system<|im_middle|>You are a helpful assistant<|im_end|>      (if no system first)
    <|im_user|>user<|im_middle|>{text | <|media_start|>image<|media_content|><|media_pad|><|media_end|>}<|im_end|>
    <|im_assistant|>assistant<|im_middle|>                                     (generation prompt)

The template renders what it is given (earlier thinking included); removing thinking from the
history is a separate step, `strip_history_thinking`, as the official demo does.
Messages are OpenAI-style dicts: {"role": ..., "content": str | [{"type": "text", "text": ...},
{"type": "image", "image": ...}, {"type": "image_url", "image_url": ...}]}.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from kimivl_cli.errors import InputError
from kimivl_cli.processor.tokenizer import Tokenizer

DEFAULT_SYSTEM_PROMPT = "You are a helpful assistant"
ROLE_TAGS = {"system": "<|im_system|>", "user": "<|im_user|>", "assistant": "<|im_assistant|>"}
MEDIA_PAD = "<|media_pad|>"
IMAGE_BLOCK = f"<|media_start|>image<|media_content|>{MEDIA_PAD}<|media_end|>"
THINK_START, THINK_END = "◁think▷", "◁/think▷"

Message = Mapping[str, Any]


def is_image_item(item: Mapping[str, Any]) -> bool:
    """The template's test: `type == "image"` or an `image` / `image_url` key."""
    return item.get("type") == "image" or "image" in item or "image_url" in item


def _content_items(message: Message) -> list[Mapping[str, Any]] | str:
    content = message.get("content")
    if isinstance(content, str):
        return content
    if not isinstance(content, Sequence) or not all(isinstance(item, Mapping) for item in content):
        raise InputError(f"{message.get('role')} message content must be text or a list of items, got {content!r}")
    for item in content:
        if not is_image_item(item) and not isinstance(item.get("text"), str):
            raise InputError(f"content item {dict(item)!r} is neither text nor an image")
    return list(content)


def template_parts(messages: Sequence[Message], add_generation_prompt: bool = True) -> list[tuple[str, bool]]:
    """The official template as (text, is_template) pieces, in order.

    Template pieces (role tags, role names, image blocks) hold the special tokens; content pieces
    (what users and documents wrote) are encoded as plain text, so a `<|im_end|>` or `<|media_pad|>`
    typed in a question or found in a PDF stays characters and never becomes a control token.
    Consecutive content text is one piece, as it is one string in the rendered template.
    """
    if not messages:
        raise InputError("a conversation needs at least one message")
    parts: list[tuple[str, bool]] = []

    def add(text: str, is_template: bool) -> None:
        if parts and parts[-1][1] == is_template:
            parts[-1] = (parts[-1][0] + text, is_template)
        elif text:
            parts.append((text, is_template))

    if messages[0].get("role") != "system":
        add(f"<|im_system|>system<|im_middle|>{DEFAULT_SYSTEM_PROMPT}<|im_end|>", True)
    for message in messages:
        role = message.get("role")
        if role not in ROLE_TAGS:
            raise InputError(f"unknown chat role {role!r}", "use system, user or assistant")
        add(f"{ROLE_TAGS[role]}{role}<|im_middle|>", True)
        content = _content_items(message)
        for item in [{"text": content}] if isinstance(content, str) else content:
            if is_image_item(item):
                add(IMAGE_BLOCK, True)
            else:
                add(item["text"], False)
        add("<|im_end|>", True)
    if add_generation_prompt:
        add("<|im_assistant|>assistant<|im_middle|>", True)
    return parts


def chat_images(messages: Sequence[Message]) -> list[Mapping[str, Any]]:
    """The image items in prompt order (what the caller must process, one grid each)."""
    return [
        item
        for message in messages
        if not isinstance(content := _content_items(message), str)
        for item in content
        if is_image_item(item)
    ]


def _check_count(placeholders: int, tokens_per_image: Sequence[int]) -> None:
    if placeholders != len(tokens_per_image):
        raise InputError(
            f"the prompt has {placeholders} image placeholders but {len(tokens_per_image)} images were given"
        )


@dataclass(frozen=True)
class ChatPrompt:
    """A rendered conversation: `text` has one pad per image, `input_ids` the expanded runs."""

    text: str
    input_ids: list[int]
    tokens_per_image: list[int]


def encode_chat(
    messages: Sequence[Message],
    tokenizer: Tokenizer,
    tokens_per_image: Sequence[int],
    add_generation_prompt: bool = True,
) -> ChatPrompt:
    """Render, tokenise, and expand each image's `<|media_pad|>` id into h*w/4 copies in order.

    Special tokens come only from the template (`template_parts`); message text is plain text
    whatever it contains. The reference processor encodes the whole rendered string with every
    special token allowed, so a document containing `<|im_end|>` would end the turn there; for
    text without special-token strings the ids are the same. Expanding ids rather than text gives
    the same ids (special tokens are atomic) without tokenising thousands of pad strings.
    """
    parts = template_parts(messages, add_generation_prompt)
    text = "".join(piece for piece, _ in parts)
    ids = [i for piece, is_template in parts for i in tokenizer.encode(piece, allow_special=is_template)]
    pad = tokenizer.media_pad_id
    _check_count(ids.count(pad), tokens_per_image)
    expanded: list[int] = []
    counts = iter(tokens_per_image)
    for token in ids:
        if token == pad:
            expanded += [pad] * next(counts)
        else:
            expanded.append(token)
    return ChatPrompt(text, expanded, list(tokens_per_image))


def strip_thinking(text: str) -> str:
    """The answer part of a thinking-model reply: text after the last `◁/think▷` (unchanged if none)."""
    return text.rpartition(THINK_END)[2]


def strip_history_thinking(messages: Sequence[Message]) -> list[dict[str, Any]]:
    """Copy of the history with thinking removed from assistant turns (the official demo's rule)."""
    out = []
    for message in messages:
        message = dict(message)
        if message.get("role") == "assistant":
            content = _content_items(message)
            if isinstance(content, str):
                message["content"] = strip_thinking(content)
            else:
                message["content"] = [
                    {**item, "text": strip_thinking(item["text"])} if not is_image_item(item) else item
                    for item in content
                ]
        out.append(message)
    return out
