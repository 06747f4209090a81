"""A tiny byte-level BPE trainer producing tiktoken ranks (for generated test checkpoints).

Ranks 0..255 are the single bytes (so any UTF-8 round-trips), then merges learned on a corpus
pre-split with the Kimi-VL pattern, then, if more ranks are asked for than the corpus yields,
filler byte strings so the vocabulary has the exact size a config needs (they are valid BPE
tokens, merged only when their halves meet). Deterministic: ties break on the byte strings.
"""

from __future__ import annotations

import base64
from collections import Counter, defaultdict
from collections.abc import Iterator
from itertools import pairwise, product
from pathlib import Path

import regex

from kimivl_cli.processor.tokenizer import PAT_STR

Pair = tuple[bytes, bytes]


def learn_merges(text: str, max_merges: int) -> list[bytes]:
    """Up to `max_merges` new tokens, most frequent adjacent pair first.

    Incremental pair counts: each merge touches only the words containing the pair,
    so the cost is about O(corpus symbols) per hundred merges rather than per merge.
    """
    words = Counter(regex.findall(PAT_STR, text))
    symbols = [[bytes([b]) for b in word.encode()] for word in words]
    freq = list(words.values())
    pair_count: Counter[Pair] = Counter()
    where: defaultdict[Pair, set[int]] = defaultdict(set)
    for w, syms in enumerate(symbols):
        for pair in pairwise(syms):
            pair_count[pair] += freq[w]
            where[pair].add(w)
    merges: list[bytes] = []
    while len(merges) < max_merges and pair_count:
        best = max(pair_count.items(), key=lambda kv: (kv[1], kv[0]))[0]
        if pair_count[best] <= 0:
            break
        merged = best[0] + best[1]
        merges.append(merged)
        for w in sorted(where.pop(best, ())):
            syms = symbols[w]
            for pair in pairwise(syms):
                pair_count[pair] -= freq[w]
            out, i = [], 0
            while i < len(syms):
                if i + 1 < len(syms) and (syms[i], syms[i + 1]) == best:
                    out.append(merged)
                    i += 2
                else:
                    out.append(syms[i])
                    i += 1
            symbols[w] = out
            for pair in pairwise(out):
                pair_count[pair] += freq[w]
                where[pair].add(w)
        pair_count = +pair_count  # drop zero counts
    return merges


def _fillers() -> Iterator[bytes]:
    """Byte strings of length 2, 3, ... in a fixed order."""
    for n in range(2, 8):
        for combo in product(range(256), repeat=n):
            yield bytes(combo)


def build_ranks(text: str, size: int) -> dict[bytes, int]:
    """Exactly `size` (>= 256) tiktoken ranks: bytes, learned merges, then fillers."""
    if size < 256:
        raise ValueError("a byte-level BPE needs at least the 256 single bytes")
    tokens = [bytes([b]) for b in range(256)]
    seen = set(tokens)
    for token in learn_merges(text, size - 256):
        if token not in seen:
            tokens.append(token)
            seen.add(token)
    fillers = _fillers()
    while len(tokens) < size:
        token = next(fillers)
        if token not in seen:
            tokens.append(token)
            seen.add(token)
    return {token: rank for rank, token in enumerate(tokens)}


def write_tiktoken_file(ranks: dict[bytes, int], path: str | Path) -> None:
    """`base64(token) rank` per line, ascending rank (the format `tiktoken.model` uses)."""
    lines = (
        f"{base64.b64encode(token).decode()} {rank}\n" for token, rank in sorted(ranks.items(), key=lambda x: x[1])
    )
    Path(path).write_text("".join(lines), encoding="ascii")
