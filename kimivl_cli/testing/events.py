"""Reading `--jsonl` event lines back into events (recorded streams in tests)."""

from __future__ import annotations

from typing import Any

from kimivl_cli.engine.events import AnswerDelta, Done, Event, ThinkingDelta, Timings, Usage


def event_from_dict(data: dict[str, Any]) -> Event:
    """Inverse of `engine.events.event_to_dict` (reads `--jsonl` output back, e.g. recorded streams in tests)."""
    kind = data.get("kind")
    if kind == "thinking":
        return ThinkingDelta(data["text"])
    if kind == "answer":
        return AnswerDelta(data["text"])
    if kind == "done":
        usage = {k: v for k, v in data.get("usage", {}).items() if k != "completion_tokens"}
        return Done(
            finish_reason=data.get("finish_reason", "stop"),
            usage=Usage(**usage),
            timings=Timings(**data.get("timings", {})),
            model=data.get("model", ""),
        )
    raise ValueError(f"not an event: kind {kind!r}")
