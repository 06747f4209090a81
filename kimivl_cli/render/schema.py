"""JSON Schemas (draft 2020-12) of what `--json` and `--jsonl` print: the contract with scripts.

Tests validate real output against these; change them together with `engine.events`.
"""

from __future__ import annotations

from typing import Any

_COUNT = {"type": "integer", "minimum": 0}
_SECONDS = {"type": "number", "minimum": 0}
_FINISH_REASON = {"enum": ["stop", "length", "interrupted"]}
_NAMES = {"type": "array", "items": {"type": "string"}}

USAGE_SCHEMA: dict[str, Any] = {
    "type": "object",
    "description": "Token counts; completion_tokens = thinking_tokens + answer_tokens.",
    "properties": {
        name: _COUNT
        for name in ("prompt_tokens", "image_tokens", "thinking_tokens", "answer_tokens", "completion_tokens")
    },
    "required": ["prompt_tokens", "image_tokens", "thinking_tokens", "answer_tokens", "completion_tokens"],
    "additionalProperties": False,
}

TIMINGS_SCHEMA: dict[str, Any] = {
    "type": "object",
    "description": "Seconds spent encoding images, reading the prompt, generating, and reasoning.",
    "properties": {name: _SECONDS for name in ("vision_s", "prefill_s", "decode_s", "thinking_s")},
    "required": ["vision_s", "prefill_s", "decode_s", "thinking_s"],
    "additionalProperties": False,
}

ANSWER_SCHEMA: dict[str, Any] = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "title": "kimivl ask --json",
    "type": "object",
    "properties": {
        "answer": {"type": "string"},
        "thinking": {"type": "string", "description": "The reasoning trace; empty for Instruct models."},
        "finish_reason": _FINISH_REASON,
        "model": {"type": "string"},
        "usage": USAGE_SCHEMA,
        "timings": TIMINGS_SCHEMA,
        "notes": {
            "type": "array",
            "items": {"type": "string"},
            "description": "Every option capped or ignored and input skipped, as told on stderr.",
        },
        "inputs": {
            "type": "object",
            "description": "The input files sent, and the files in folders that were skipped.",
            "properties": {"sent": _NAMES, "skipped": _NAMES},
            "required": ["sent", "skipped"],
            "additionalProperties": False,
        },
    },
    "required": ["answer", "thinking", "finish_reason", "model", "usage", "timings", "notes"],
    "additionalProperties": False,
}

EVENT_SCHEMA: dict[str, Any] = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "title": "kimivl ask --jsonl (one event per line)",
    "oneOf": [
        {
            "type": "object",
            "properties": {"kind": {"enum": ["thinking", "answer"]}, "text": {"type": "string"}},
            "required": ["kind", "text"],
            "additionalProperties": False,
        },
        {
            "type": "object",
            "properties": {
                "kind": {"const": "done"},
                "finish_reason": _FINISH_REASON,
                "model": {"type": "string"},
                "usage": USAGE_SCHEMA,
                "timings": TIMINGS_SCHEMA,
            },
            "required": ["kind", "finish_reason", "model", "usage", "timings"],
            "additionalProperties": False,
        },
    ],
}
