"""Long-document QA: which PDF pages to send, and at what resolution, so they fit the context.

A page's natural cost is what it takes at the default render (`media.pdf.DEFAULT_DPI`, then the
processor's own token limit, ~1,000 tokens for a Letter page). Given the image-token budget left
after the text and the answer:

1. everything fits at its natural cost: all pages, untouched;
2. all pages fit at `min_page_tokens` or more each: all pages, each capped at the largest common
   cap that fits (water-filling: pages already below the cap keep their size);
3. otherwise the pages are ranked by BM25 over their text layer against the question, the best
   ones that fit at `min_page_tokens` are kept, in page order, and capped as in 2.

Everything here is pure (numbers and strings in, a `PagePlan` out), so it is tested directly.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

MIN_PAGE_TOKENS = 256
"""The smallest page worth sending: ~450x600 pixels, where body text is still legible."""

BM25_K1 = 1.5
BM25_B = 0.75

# Words too common to say anything about a page's relevance (English; other languages rank on all words).
_STOPWORD_TEXT = (
    "a an and are as at be by can do does for from has have how i in is it its of on or that the this to "
    "was what when where which who why will with you your"
)
_STOPWORDS = frozenset(_STOPWORD_TEXT.split())
_WORD = re.compile(r"\w+", re.UNICODE)


def terms(text: str) -> list[str]:
    """Lower-cased words of `text`, without stopwords and single characters."""
    return [w for w in _WORD.findall(text.casefold()) if len(w) > 1 and w not in _STOPWORDS]


def bm25_scores(query: str, documents: Sequence[str], k1: float = BM25_K1, b: float = BM25_B) -> list[float]:
    """Okapi BM25 score of each document for `query` (0.0 when no query term occurs in it).

    idf = ln(1 + (N - df + 0.5) / (df + 0.5)) (never negative). O(total words).
    """
    docs = [Counter(terms(d)) for d in documents]
    lengths = [sum(c.values()) for c in docs]
    avg = (sum(lengths) / len(docs)) if docs and sum(lengths) else 1.0
    query_terms = set(terms(query))
    n = len(docs)
    idf = {t: math.log(1 + (n - (df := sum(t in d for d in docs)) + 0.5) / (df + 0.5)) for t in query_terms}
    scores = []
    for counts, length in zip(docs, lengths, strict=True):
        score = 0.0
        for t in query_terms:
            tf = counts.get(t, 0)
            if tf:
                score += idf[t] * tf * (k1 + 1) / (tf + k1 * (1 - b + b * length / avg))
        scores.append(score)
    return scores


def common_cap(costs: Sequence[int], budget: int) -> int | None:
    """The largest cap c with sum(min(cost, c)) <= budget, or None when no cap is needed.

    Binary search over c: O(n log max(cost)).
    """
    if sum(costs) <= budget:
        return None
    lo, hi = 0, max(costs)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if sum(min(c, mid) for c in costs) <= budget:
            lo = mid
        else:
            hi = mid - 1
    return lo


@dataclass(frozen=True)
class PagePlan:
    """Which pages to send (indexes into the candidates, ascending) and the per-page token cap."""

    keep: tuple[int, ...]
    cap: int | None  # None: natural size
    ranked: bool  # True when pages were dropped by relevance
    matched: bool  # whether the question matched any page's text (ranking is by page order otherwise)

    def tokens(self, costs: Sequence[int]) -> int:
        return sum(costs[i] if self.cap is None else min(costs[i], self.cap) for i in self.keep)


def plan_pages(
    costs: Sequence[int],
    texts: Sequence[str],
    question: str,
    budget: int,
    min_page_tokens: int = MIN_PAGE_TOKENS,
    overheads: Sequence[int] | None = None,
) -> PagePlan:
    """Fit pages of natural image-token `costs` into `budget` tokens (see the module docstring).

    `overheads`: tokens each page costs besides its image (its label), paid by every page kept.
    Returns an empty `keep` when not even one page fits at `min_page_tokens`; the caller says so.
    Ties in relevance go to the earlier page, so a question that matches nothing keeps the first pages.
    """
    extra = list(overheads) if overheads is not None else [0] * len(costs)
    everything = tuple(range(len(costs)))
    if sum(costs) + sum(extra) <= budget:
        return PagePlan(everything, None, ranked=False, matched=False)
    floor = [min(c, min_page_tokens) + e for c, e in zip(costs, extra, strict=True)]
    if sum(floor) <= budget:
        return PagePlan(everything, common_cap(costs, budget - sum(extra)), ranked=False, matched=False)
    scores = bm25_scores(question, texts)
    order = sorted(everything, key=lambda i: (-scores[i], i))
    keep, used = [], 0
    for i in order:
        if used + floor[i] <= budget:
            keep.append(i)
            used += floor[i]
    keep.sort()
    cap = common_cap([costs[i] for i in keep], budget - sum(extra[i] for i in keep)) if keep else None
    return PagePlan(tuple(keep), cap, ranked=True, matched=any(scores[i] > 0 for i in keep))


def page_list(numbers: Sequence[int]) -> str:
    """1-based page numbers as ranges: [1, 2, 3, 7, 9, 10] -> '1-3, 7, 9-10'."""
    runs: list[list[int]] = []
    for n in sorted(numbers):
        if runs and n == runs[-1][-1] + 1:
            runs[-1].append(n)
        else:
            runs.append([n])
    return ", ".join(str(r[0]) if len(r) == 1 else f"{r[0]}-{r[-1]}" for r in runs)
