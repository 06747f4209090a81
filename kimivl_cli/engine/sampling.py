"""Next-token sampling: settings, checkpoint defaults, and a sync-free `sample`.

`sample` is a pure function of (logits, settings, RNG, history) built from device tensor
ops only: no `.item()`, no data-dependent shapes (`nonzero`, boolean indexing), no Python
branches on tensor values. The settings are plain Python numbers, fixed for a generation,
so the same code can be captured once in a CUDA graph and replayed every decode step.

Filters run in the order transformers applies them: repetition penalty, temperature,
top-k, top-p, min-p; then one categorical draw. Shapes: B rows (sequences), V vocabulary,
L history tokens.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from kimivl_cli.errors import CheckpointError, InputError
from kimivl_cli.guards import inside, read_config

# The model cards' recommended settings: the Thinking model reasons for thousands of tokens.
THINKING_DEFAULTS = {"temperature": 0.8, "max_new_tokens": 32768}
INSTRUCT_DEFAULTS = {"temperature": 0.2, "max_new_tokens": 512}

# generation_config.json keys we honour (transformers' names and meaning) and their types.
_GENERATION_CONFIG_KEYS = {
    "temperature": float,
    "top_p": float,
    "top_k": int,
    "min_p": float,
    "repetition_penalty": float,
    "max_new_tokens": int,
}


@dataclass(frozen=True)
class SamplingParams:
    """How to pick each next token. `temperature == 0` is greedy; 0 / 1.0 / None switch a filter off."""

    temperature: float = INSTRUCT_DEFAULTS["temperature"]
    top_p: float = 1.0  # keep the smallest set of tokens whose probability mass reaches top_p
    top_k: int = 0  # keep the k most likely tokens (0: all)
    min_p: float = 0.0  # drop tokens less likely than min_p x the most likely one
    repetition_penalty: float = 1.0  # CTRL: divide positive / multiply negative logits of seen tokens
    seed: int | None = None
    max_new_tokens: int = INSTRUCT_DEFAULTS["max_new_tokens"]
    thinking_budget: int | None = None  # most reasoning tokens before `◁/think▷` is forced
    stop_token_ids: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        checks = [
            ("temperature", math.isfinite(self.temperature) and self.temperature >= 0, "a number >= 0 (0 = greedy)"),
            ("top_p", 0 < self.top_p <= 1, "in (0, 1]"),
            ("top_k", self.top_k >= 0, "an integer >= 0 (0 = off)"),
            ("min_p", 0 <= self.min_p <= 1, "in [0, 1]"),
            ("repetition_penalty", math.isfinite(self.repetition_penalty) and self.repetition_penalty > 0, "> 0"),
            ("max_new_tokens", self.max_new_tokens >= 1, "at least 1"),
            ("thinking_budget", self.thinking_budget is None or self.thinking_budget >= 0, "at least 0"),
            ("seed", self.seed is None or -(2**63) <= self.seed < 2**64, "an integer that fits 64 bits"),
        ]
        for name, ok, expected in checks:
            if not ok:
                raise InputError(f"{name} must be {expected}, got {getattr(self, name)!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def with_overrides(self, **overrides: Any) -> SamplingParams:
        """A copy with the given fields replaced; `None` values (options the user did not pass) are ignored."""
        return replace(self, **{k: v for k, v in overrides.items() if v is not None})

    @classmethod
    def from_checkpoint(
        cls, folder: str | Path, thinking: bool, stop_token_ids: tuple[int, ...] = ()
    ) -> SamplingParams:
        """Defaults for a checkpoint: its `generation_config.json` where it sets a value, else the model card's.

        `thinking` picks the model-card column (Thinking 0.8 / 32768 tokens, Instruct 0.2 / 512).
        `do_sample: false` means greedy, as in transformers; `eos_token_id` values join `stop_token_ids`.
        """
        values: dict[str, Any] = dict(THINKING_DEFAULTS if thinking else INSTRUCT_DEFAULTS)
        path = inside(Path(folder), "generation_config.json")
        config = read_config(
            path, "generation_config.json", fix_hint="fix or delete generation_config.json", optional=True
        )
        values.update({k: config[k] for k in _GENERATION_CONFIG_KEYS if config.get(k) is not None})
        if config.get("do_sample") is False:
            values["temperature"] = 0.0
        eos = config.get("eos_token_id")
        eos_ids = [eos] if isinstance(eos, int) else list(eos or [])
        if not all(isinstance(i, int) and not isinstance(i, bool) for i in eos_ids):
            raise CheckpointError(f"{path}: eos_token_id must be an integer or a list of integers, got {eos!r}")
        values["stop_token_ids"] = tuple(dict.fromkeys([*stop_token_ids, *eos_ids]))
        try:
            for key, kind in _GENERATION_CONFIG_KEYS.items():
                value = values.get(key)
                if value is None:
                    continue
                if isinstance(value, bool) or not isinstance(value, (int, float)):
                    raise InputError(f"{key} must be a number, got {value!r}")
                values[key] = kind(value)
            return cls(**values)
        except (InputError, ValueError, OverflowError) as exc:
            raise CheckpointError(f"{path}: {exc}", "fix or delete generation_config.json") from None


def is_thinking_model(name_or_path: str | Path) -> bool:
    """Thinking checkpoints are told apart by name only (e.g. `Kimi-VL-A3B-Thinking-2506`): the configs match."""
    return "thinking" in Path(str(name_or_path).rstrip("/")).name.lower()


def make_generator(seed: int | None, device: torch.device | str) -> torch.Generator | None:
    """A seeded RNG on `device` (None: torch's global RNG, different every run)."""
    if seed is None:
        return None
    generator = torch.Generator(device=device)
    generator.manual_seed(seed)
    return generator


# --- the filters: each maps logits [B, V] to logits with excluded tokens at -inf ------------------


def apply_repetition_penalty(logits: torch.Tensor, prev_tokens: torch.Tensor, penalty: float) -> torch.Tensor:
    """CTRL penalty on every token id in `prev_tokens` [B, L] (ids < 0 are padding). O(B x (V + L)).

    A seen token's logit is divided by `penalty` when positive and multiplied when negative,
    once however often it occurred (transformers' `RepetitionPenaltyLogitsProcessor`).
    """
    B, V = logits.shape
    # Padding goes to an extra column V that is cut off, so the scatter needs no mask.
    index = torch.where(prev_tokens < 0, V, prev_tokens).long()
    seen = torch.zeros(B, V + 1, dtype=torch.bool, device=logits.device)
    seen.scatter_(1, index, True)
    penalised = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen[:, :V], penalised, logits)


def apply_top_k(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Keep the k largest logits per row (ties with the k-th are kept)."""
    kth = torch.topk(logits, min(k, logits.shape[-1]), dim=-1).values[:, -1:]
    return logits.masked_fill(logits < kth, -math.inf)


def apply_top_p(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Nucleus: keep the most likely tokens until their mass reaches p (ties at the edge are all kept).

    Finds the largest probability threshold t with mass(probs >= t) >= p by bisection over the
    bit patterns of float32 (ordered like the values for non-negative floats): 31 masked sums,
    O(31 V), exact up to float32 summation, no sort (faster than `torch.sort` at the real vocabulary:
    docs/performance.md).
    """
    probs = logits.float().softmax(dim=-1)
    bits = probs.view(torch.int32)  # [B, V]
    B = logits.shape[0]
    lo = torch.zeros(B, 1, dtype=torch.int32, device=logits.device)  # mass(probs >= 0) = 1 >= p
    hi = bits.amax(dim=-1, keepdim=True) + 1  # mass(probs > max) = 0 < p
    for _ in range(31):  # hi - lo < 2^31 halves to 1
        mid = lo + (hi - lo) // 2
        enough = torch.where(bits >= mid, probs, 0.0).sum(dim=-1, keepdim=True) >= p
        lo = torch.where(enough, mid, lo)
        hi = torch.where(enough, hi, mid)
    return logits.masked_fill(bits < lo, -math.inf)


def apply_min_p(logits: torch.Tensor, min_p: float) -> torch.Tensor:
    """Drop tokens whose probability is below min_p x the row's top probability."""
    probs = logits.softmax(dim=-1)
    threshold = min_p * probs.amax(dim=-1, keepdim=True)
    return logits.masked_fill(probs < threshold, -math.inf)


def filter_logits(
    logits: torch.Tensor, params: SamplingParams, prev_tokens: torch.Tensor | None = None
) -> torch.Tensor:
    """float32 logits [B, V] after penalty, temperature and the truncation filters (greedy: penalty only)."""
    out = logits.float()
    if params.repetition_penalty != 1.0 and prev_tokens is not None:
        out = apply_repetition_penalty(out, prev_tokens, params.repetition_penalty)
    if params.greedy:
        return out
    out = out / params.temperature
    if params.top_k > 0:
        out = apply_top_k(out, params.top_k)
    if params.top_p < 1.0:
        out = apply_top_p(out, params.top_p)
    if params.min_p > 0.0:
        out = apply_min_p(out, params.min_p)
    return out


def sample(
    logits: torch.Tensor,
    params: SamplingParams,
    generator: torch.Generator | None = None,
    prev_tokens: torch.Tensor | None = None,
) -> torch.Tensor:
    """Next token ids [B] (int64, on the logits' device) from logits [B, V].

    The draw inverts the cumulative distribution at one uniform number per row (O(V), one
    random number), instead of `torch.multinomial`, which synchronises with the host on CUDA.
    """
    filtered = filter_logits(logits, params, prev_tokens)
    if params.greedy:
        return filtered.argmax(dim=-1)
    probs = filtered.softmax(dim=-1)
    cdf = probs.cumsum(dim=-1)
    # u in (0, total]: the first index with cdf >= u has probability > 0 and is within the vocabulary...
    u = (1.0 - torch.rand(cdf.shape[0], 1, generator=generator, device=cdf.device)) * cdf[:, -1:]
    ids = torch.searchsorted(cdf, u).clamp_max_(cdf.shape[-1] - 1)  # [B, 1]
    # ...given a monotone cdf; a parallel scan's rounding can break that by an ulp, so check.
    return torch.where(probs.gather(1, ids) > 0, ids, probs.argmax(dim=-1, keepdim=True)).squeeze(-1)
