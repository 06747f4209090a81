"""Grammar-constrained decoding: the answer is JSON (any object, or valid against a JSON Schema).

xgrammar compiles the schema once per tokenizer into a pushdown automaton with a precomputed
token-mask cache; per step a `JsonGuide` asks it which tokens may come next and sets every
other logit to -inf before sampling. Picked over llguidance because its masks cost a fraction of
llguidance's per token, without the latter's many-millisecond outliers
(`benchmarks/grammar_overhead.py`, figures in the README).

Random or weak weights may never close a string or a number by themselves, so the guide also
finishes in time: once the tokens left get close to what the shortest way to close the
document needs (found greedily: the stop token, then `"`, `}`, `]`, `,`, `0`, ... else the shortest
allowed token), it forces that closing. Output is then valid JSON whenever the budget can
hold the shortest document at all. Shapes: V vocabulary (the model's, the logits' last dim).
"""

from __future__ import annotations

import json
import threading
from collections import OrderedDict
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from kimivl_cli.engine.events import JsonFormat
from kimivl_cli.errors import InputError

if TYPE_CHECKING:
    from kimivl_cli.processor.tokenizer import Tokenizer

# Tried in this order when closing a document: each ends a string, container or number, or
# fills a value with the fewest tokens. `"` first: inside a string `}` would only add text;
# `0` after `,`: in a number it would only add digits.
_CLOSERS = ('"', "}", "]", ",", "0", ":", "[", "{")
CLOSE_MARGIN = 8
"""The shortest closing is looked for once the tokens left are within this many of it."""
CLOSE_SLACK = 4
"""It is forced this many tokens early: one sampled token can lengthen it (a cut UTF-8 character,
a string opened), and the forced run must still end before the budget does."""
_MAX_CLOSING = 512  # a closing longer than this is not looked for (a schema that deep is its own problem)
KEPT_GRAMMARS = 64  # compiled formats kept (a server sees many schemas; video-scenes one per video)


class Grammars:
    """One tokenizer's xgrammar compiler and compiled formats (cached: a schema compiles once).

    `vocab_size` is the model's (the logits' width); tokenizer ids past it are never allowed,
    special tokens never inside the JSON, `stop_ids` only once the document is complete.
    """

    def __init__(self, tokenizer: Tokenizer, vocab_size: int, stop_ids: Sequence[int]) -> None:
        import xgrammar as xgr

        self._xgr = xgr
        n = min(vocab_size, tokenizer.vocab_size)
        vocab = [b"" if tokenizer.is_special(i) else tokenizer.token_bytes(i) for i in range(n)]
        self.vocab_size = vocab_size
        self.stop_ids = [i for i in dict.fromkeys(stop_ids) if i < vocab_size]
        info = xgr.TokenizerInfo(vocab, xgr.VocabType.RAW, vocab_size=vocab_size, stop_token_ids=self.stop_ids)
        self._compiler = xgr.GrammarCompiler(info, max_threads=1)
        self._compiled: OrderedDict[str, Any] = OrderedDict()  # least recently used first
        self._lock = threading.Lock()
        lengths = np.full(vocab_size, np.iinfo(np.int32).max, dtype=np.int64)
        lengths[:n] = [len(b) if b else np.iinfo(np.int32).max for b in vocab]
        self.token_lengths = lengths
        ranks = {tokenizer.token_bytes(i): i for i in range(n) if not tokenizer.is_special(i)}
        self.closers = [ranks[c.encode()] for c in _CLOSERS if c.encode() in ranks]

    def compile(self, fmt: JsonFormat) -> Any:
        """The compiled grammar for `fmt`; InputError for a schema xgrammar cannot compile."""
        key = json.dumps(fmt.schema, sort_keys=True)
        with self._lock:
            if key not in self._compiled:
                try:
                    if fmt.schema is None:  # OpenAI's json_object: any object, compact
                        compiled = self._compiler.compile_json_schema(
                            '{"type": "object"}', any_whitespace=False, strict_mode=False
                        )
                    else:  # properties come out in the schema's order
                        schema = json.dumps(fmt.schema)
                        compiled = self._compiler.compile_json_schema(schema, any_whitespace=False, strict_mode=True)
                except (RuntimeError, ValueError, TypeError) as exc:
                    raise InputError(f"cannot use this JSON Schema: {_first_line(exc)}") from None
                self._compiled[key] = compiled
                if len(self._compiled) > KEPT_GRAMMARS:
                    self._compiled.popitem(last=False)
            self._compiled.move_to_end(key)
            return self._compiled[key]

    def guide(self, fmt: JsonFormat) -> JsonGuide:
        return JsonGuide(self, self.compile(fmt))


def _first_line(exc: Exception) -> str:
    lines = [line for line in str(exc).splitlines() if line.strip()]
    return lines[-1].strip() if lines else type(exc).__name__


class JsonGuide:
    """One request's constraint: `mask_(logits)` before each sample, `accept(id)` after it.

    Inactive until `start()` (a Thinking model reasons freely first); `closing(left)` says which
    ids to force so the document ends within `left` tokens (stop token included).
    """

    def __init__(self, grammars: Grammars, compiled: Any) -> None:
        xgr = grammars._xgr
        self._grammars = grammars
        self._matcher = xgr.GrammarMatcher(compiled)
        self._bitmask = xgr.allocate_token_bitmask(1, grammars.vocab_size)
        self.active = False
        # `left` at or below which `closing` looks for the shortest closing; at first, what the
        # shortest whole document needs (a Thinking model must stop reasoning before that).
        self.window = len(self._shortest_closing() or []) + 1 + CLOSE_MARGIN

    def start(self) -> None:
        self.active = True

    def allowed(self) -> np.ndarray:
        """bool [V]: the tokens the grammar allows next (bit j of word i is token 32i + j)."""
        self._matcher.fill_next_token_bitmask(self._bitmask)
        bits = np.unpackbits(self._bitmask.numpy().view(np.uint8), bitorder="little")
        return bits[: self._grammars.vocab_size].view(np.bool_)

    def mask_(self, logits: torch.Tensor) -> None:
        """Set the logits [1, V] of disallowed tokens to -inf, in place."""
        allowed = torch.from_numpy(self.allowed()).to(logits.device, non_blocking=True)
        logits.masked_fill_(~allowed, float("-inf"))

    def accept(self, token_id: int) -> None:
        if not self._matcher.accept_token(token_id):
            raise RuntimeError(f"the grammar refused token {token_id} it had allowed")

    def closing(self, left: int) -> list[int]:
        """Ids to force now so the document (and then the stop token) fits in `left` more tokens; [] if not yet."""
        if left > self.window and left % CLOSE_MARGIN:
            return []  # far from the end: look again every CLOSE_MARGIN tokens, in case it grew
        ids = self._shortest_closing()
        if ids is None:
            return []
        self.window = max(self.window, len(ids) + 1 + CLOSE_MARGIN)
        return ids if len(ids) + 1 + CLOSE_SLACK >= left else []

    def _shortest_closing(self) -> list[int] | None:
        """A short way to complete the document, found greedily on the matcher and rolled back."""
        grammars, matcher = self._grammars, self._matcher
        ids: list[int] = []
        try:
            while len(ids) <= _MAX_CLOSING:
                allowed = self.allowed()
                if matcher.is_completed() or any(allowed[i] for i in grammars.stop_ids):
                    return ids
                pick = next((i for i in grammars.closers if allowed[i]), None)
                if pick is None:
                    candidates = np.flatnonzero(allowed)
                    if not len(candidates):
                        return None
                    pick = int(candidates[np.argmin(grammars.token_lengths[candidates])])
                if not matcher.accept_token(pick):
                    return None
                ids.append(pick)
            return None
        finally:
            if ids:
                matcher.rollback(len(ids))
