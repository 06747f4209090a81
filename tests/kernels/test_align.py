"""Alignment invariants, property-tested."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kimivl_cli.kernels.align import align_tokens, max_padded_rows


@st.composite
def routings(draw: st.DrawFn) -> tuple[torch.Tensor, int, int]:
    e = draw(st.integers(1, 24))
    k = draw(st.integers(1, min(e, 8)))
    t = draw(st.integers(1, 40))
    seed = draw(st.integers(0, 2**16))
    gen = torch.Generator().manual_seed(seed)
    idx = torch.stack([torch.randperm(e, generator=gen)[:k] for _ in range(t)])
    return idx, e, draw(st.sampled_from([1, 4, 16, 64]))


@settings(max_examples=60, deadline=None)
@given(routings())
def test_alignment_invariants(case: tuple[torch.Tensor, int, int]) -> None:
    idx, e, bm = case
    pairs = idx.numel()
    a = align_tokens(idx, e, bm)
    used = int(a.num_padded.item())
    sorted_pairs = a.sorted_pairs.tolist()
    assert len(sorted_pairs) == max_padded_rows(pairs, e, bm) and len(sorted_pairs) % bm == 0
    assert used % bm == 0 and used <= len(sorted_pairs)
    assert a.block_expert.numel() == len(sorted_pairs) // bm
    real = [p for p in sorted_pairs[:used] if p != pairs]
    assert sorted(real) == list(range(pairs))  # every pair exactly once, all within the used rows
    assert all(p == pairs for p in sorted_pairs[used:])
    flat = idx.reshape(-1).tolist()
    block_expert = a.block_expert.tolist()
    for b in range(used // bm):
        block = [p for p in sorted_pairs[b * bm : (b + 1) * bm] if p != pairs]
        assert block, "a used block holds at least one pair"
        assert all(flat[p] == block_expert[b] for p in block)
        assert block == sorted(block)  # token order kept inside an expert
    assert block_expert[: used // bm] == sorted(block_expert[: used // bm])
    counts = torch.bincount(idx.reshape(-1), minlength=e)
    assert used == int(((counts + bm - 1) // bm * bm).sum())
