"""Token alignment for grouped GEMMs: (token, expert) pairs sorted by expert, blocks padded.

Shapes: T tokens, K experts per token, P = T*K pairs (pair p = token p // K, slot p % K),
E experts, BM rows per block. Each expert's pairs form a run of whole BM-row blocks, so a
kernel program handles one block and one expert. Padding rows hold the id P ("no pair").

No host synchronisation: every size is a static upper bound computed from P, E and BM
(never from routing results), and only scatter/cumsum/sort/searchsorted are used, so the
whole step can be captured in a CUDA graph. Cost O(P log P + E); memory O(P + E*BM).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Alignment:
    sorted_pairs: torch.Tensor  # [S] int32: pair ids grouped by expert, P marks padding
    block_expert: torch.Tensor  # [S / BM] int32: the expert of each block
    num_padded: torch.Tensor  # [1] int32: rows in use (blocks past it are idle)
    block_m: int


def max_padded_rows(pairs: int, n_experts: int, block_m: int) -> int:
    """Upper bound on the padded rows: at most min(E, P) non-empty experts each waste < BM rows."""
    rows = pairs + min(n_experts, pairs) * (block_m - 1)
    return -(-rows // block_m) * block_m


def align_tokens(idx: torch.Tensor, n_experts: int, block_m: int) -> Alignment:
    """idx [T, K] expert ids -> pairs sorted by expert with each expert padded to BM rows."""
    flat = idx.reshape(-1).long()  # [P]
    pairs = flat.numel()
    rows = max_padded_rows(pairs, n_experts, block_m)
    counts = torch.zeros(n_experts, dtype=torch.long, device=flat.device)
    counts.scatter_add_(0, flat, torch.ones_like(flat))  # bincount without a host sync
    padded = (counts + block_m - 1) // block_m * block_m
    ends = padded.cumsum(0)  # [E]
    starts = ends - padded
    order = torch.sort(flat, stable=True).indices  # pairs by expert, token order kept
    expert = flat[order]
    first = (counts.cumsum(0) - counts)[expert]  # index of the expert's first pair in `order`
    dest = starts[expert] + torch.arange(pairs, device=flat.device) - first
    sorted_pairs = torch.full((rows,), pairs, dtype=torch.int32, device=flat.device)
    sorted_pairs.scatter_(0, dest, order.int())
    block_start = torch.arange(0, rows, block_m, device=flat.device)
    block_expert = torch.searchsorted(ends, block_start, right=True).clamp_(max=n_experts - 1)
    return Alignment(sorted_pairs, block_expert.int(), ends[-1:].int(), block_m)
