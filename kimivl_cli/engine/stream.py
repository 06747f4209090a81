"""From generated tokens to thinking and answer: the text splitter and the thinking budget.

Thinking checkpoints write `◁think▷ reasoning ◁/think▷ answer`; Instruct ones write the
answer only. Two small state machines follow that shape, one per level, both pure:

- `ThinkingSplitter` (text): decoded deltas in, `ThinkingDelta` / `AnswerDelta` out, markers
  removed, whatever the cut points between deltas (a delta ending in a possible marker prefix
  is held back until the next one decides).
- `ThinkingBudget` (token ids): counts thinking vs answer tokens and tells the decode loop when
  to force the end marker, so `thinking_budget=N` gives N reasoning tokens and then the answer.

Both read the block as: optional preamble (answer text, rare), `◁think▷`, thinking up to
`◁/think▷`, then answer to the end. Like the model card's `extract_thinking_and_summary`,
each part is stripped of surrounding whitespace.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Sequence
from enum import Enum
from typing import Union

from kimivl_cli.engine.events import AnswerDelta, ThinkingDelta
from kimivl_cli.processor.chat import THINK_END, THINK_START

TextDelta = Union[ThinkingDelta, AnswerDelta]


class Phase(Enum):
    PREAMBLE = "preamble"  # before any marker: text is answer, either marker may come
    THINKING = "thinking"  # after `◁think▷`: text is reasoning until `◁/think▷`
    ANSWER = "answer"  # after `◁/think▷`: everything is answer, markers included


# The markers each phase watches for, and the phase each one leads to.
_TEXT_MARKERS: dict[Phase, tuple[tuple[str, Phase], ...]] = {
    Phase.PREAMBLE: ((THINK_START, Phase.THINKING), (THINK_END, Phase.ANSWER)),
    Phase.THINKING: ((THINK_END, Phase.ANSWER),),
    Phase.ANSWER: (),
}


def _held_prefix_len(text: str, markers: Sequence[str]) -> int:
    """Length of the longest tail of `text` that is a proper prefix of a marker (0 if none)."""
    best = 0
    for marker in markers:
        for n in range(min(len(marker) - 1, len(text)), best, -1):
            if text.endswith(marker[:n]):
                best = n
                break
    return best


class ThinkingSplitter:
    """Decoded text deltas -> thinking / answer deltas. O(total text); holds back at most one marker.

    `feed(text)` returns the deltas that are certain so far; `flush()` at the end of generation
    returns the rest. With `show_thinking=False` thinking is consumed but never emitted.
    Concatenated outputs do not depend on how the text was cut into deltas.
    """

    def __init__(self, show_thinking: bool = True) -> None:
        self.show_thinking = show_thinking
        self.phase = Phase.PREAMBLE
        self._held = ""  # a possible marker prefix at the end of the text so far
        self._space = {Phase.THINKING: "", Phase.ANSWER: ""}  # trailing whitespace: inner or final?
        self._started = {Phase.THINKING: False, Phase.ANSWER: False}

    @property
    def in_thinking(self) -> bool:
        return self.phase is Phase.THINKING

    def feed(self, text: str) -> list[TextDelta]:
        out: list[TextDelta] = []
        buf = self._held + text
        while True:
            hits = [(buf.find(m), m, nxt) for m, nxt in _TEXT_MARKERS[self.phase] if m in buf]
            if not hits:
                break
            at, marker, nxt = min(hits, key=lambda hit: hit[0])
            self._emit(buf[:at], out)
            if self.phase is Phase.THINKING:
                self._space[Phase.THINKING] = ""  # whitespace before `◁/think▷` is not reasoning
            self.phase = nxt
            buf = buf[at + len(marker) :]
        keep = _held_prefix_len(buf, [m for m, _ in _TEXT_MARKERS[self.phase]])
        self._held = buf[len(buf) - keep :] if keep else ""
        self._emit(buf[: len(buf) - keep], out)
        return out

    def flush(self) -> list[TextDelta]:
        """The end of the text: a held-back marker prefix was plain text; final whitespace is dropped."""
        out: list[TextDelta] = []
        self._emit(self._held, out)
        self._held = ""
        return out

    def _emit(self, text: str, out: list[TextDelta]) -> None:
        part = Phase.THINKING if self.phase is Phase.THINKING else Phase.ANSWER
        if not self._started[part]:
            text = text.lstrip()
        if not text:
            return
        text = self._space[part] + text
        body = text.rstrip()
        self._space[part] = text[len(body) :]
        if not body:
            return
        self._started[part] = True
        if part is Phase.ANSWER:
            out.append(AnswerDelta(body))
        elif self.show_thinking:
            out.append(ThinkingDelta(body))


def split_thinking(text: str) -> tuple[str, str]:
    """(thinking, answer) of a whole reply, by the streaming splitter's rules: the one way a reply
    is split (history's `strip_thinking` keeps the official demo's last-marker rule for prompts)."""
    splitter = ThinkingSplitter()
    deltas = splitter.feed(text) + splitter.flush()
    thinking = "".join(d.text for d in deltas if isinstance(d, ThinkingDelta))
    return thinking, "".join(d.text for d in deltas if isinstance(d, AnswerDelta))


class StopText:
    """Answer text in, the same text out up to the first of `stops` (OpenAI's `stop`), which is
    never emitted. A delta ending in a possible start of a stop string is held back until the
    next one decides; `hit` tells that the answer is over."""

    def __init__(self, stops: Sequence[str]) -> None:
        self.stops = [stop for stop in stops if stop]
        self.hit = False
        self._held = ""

    def feed(self, text: str) -> str:
        if self.hit:
            return ""
        buf = self._held + text
        found = [buf.find(stop) for stop in self.stops if stop in buf]
        if found:
            self.hit, self._held = True, ""
            return buf[: min(found)]
        keep = _held_prefix_len(buf, self.stops)
        self._held = buf[len(buf) - keep :] if keep else ""
        return buf[: len(buf) - keep]

    def flush(self) -> str:
        held, self._held = self._held, ""
        return "" if self.hit else held


class ThinkingBudget:
    """Token-level thinking state: usage counts, thinking time, and the forced end of a long block.

    Feed every generated token id in order (sampled and forced alike, stop tokens excluded);
    `feed` returns the ids the loop must emit next instead of sampling, which is the rest of
    `end_ids` once `budget` reasoning tokens have followed the start marker (budget None: never).
    The marker tokens count as thinking, so thinking_tokens + answer_tokens = tokens fed.
    Markers are matched as id sequences (`tokenizer.encode("◁think▷")`), so a model that spells
    one with other tokens is not seen here even though the text splitter sees it.
    """

    def __init__(
        self,
        budget: int | None,
        start_ids: Sequence[int],
        end_ids: Sequence[int],
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        if not start_ids or not end_ids:
            raise ValueError("thinking markers must encode to at least one token")
        self.budget = budget
        self.start_ids = tuple(start_ids)
        self.end_ids = tuple(end_ids)
        self.phase = Phase.PREAMBLE
        self.thinking_tokens = 0
        self.answer_tokens = 0
        self.reasoning_tokens = 0  # tokens since the start marker, the ones the budget limits
        self._clock = clock
        self._recent: deque[int] = deque(maxlen=max(len(self.start_ids), len(self.end_ids)))
        self._forcing = False
        self._started_at: float | None = None
        self._ended_at: float | None = None

    @property
    def in_thinking(self) -> bool:
        return self.phase is Phase.THINKING

    @property
    def thinking_s(self) -> float:
        """Seconds from the start marker to the end marker (or to now while thinking)."""
        if self._started_at is None:
            return 0.0
        return (self._ended_at if self._ended_at is not None else self._clock()) - self._started_at

    def feed(self, token_id: int) -> list[int]:
        self._recent.append(token_id)
        if self.phase is Phase.ANSWER:
            self.answer_tokens += 1
            return []
        if self.phase is Phase.PREAMBLE:
            self.answer_tokens += 1
            if self._tail_is(self.start_ids):
                # The marker's earlier tokens were counted as answer before the match was complete.
                self.answer_tokens -= len(self.start_ids)
                self.thinking_tokens += len(self.start_ids)
                self.phase = Phase.THINKING
                self._started_at = self._clock()
                return self._force_if_spent()
            if self._tail_is(self.end_ids):
                self.phase = Phase.ANSWER
            return []
        self.thinking_tokens += 1
        if self._tail_is(self.end_ids):
            self.phase = Phase.ANSWER
            self._ended_at = self._clock()
            return []
        if self._forcing:
            return []
        self.reasoning_tokens += 1
        return self._force_if_spent()

    def _tail_is(self, ids: tuple[int, ...]) -> bool:
        n = len(ids)
        return len(self._recent) >= n and tuple(self._recent)[-n:] == ids

    def _force_if_spent(self) -> list[int]:
        if self.budget is None or self.reasoning_tokens < self.budget:
            return []
        return self.end_now()

    def end_now(self) -> list[int]:
        """The ids that end the reasoning now (what is left of the end marker); [] unless thinking
        and not already ending it. The loop must force them next."""
        if self.phase is not Phase.THINKING or self._forcing:
            return []
        self._forcing = True
        # If the model already began the end marker (after the start marker), force only its remainder.
        longest = min(len(self.end_ids) - 1, self.reasoning_tokens)
        done = next((n for n in range(longest, 0, -1) if self._tail_is(self.end_ids[:n])), 0)
        return list(self.end_ids[done:])
