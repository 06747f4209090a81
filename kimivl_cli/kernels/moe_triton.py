"""Triton grouped GEMM with in-kernel NF4 dequantisation: the fused MoE and dense NF4 linears.

Shapes: T tokens, H hidden, I expert intermediate, E experts, K experts per token,
P = T*K (token, expert) pairs, S padded rows (see `align.py`), BM/BN/BK tile sizes.

One kernel, `_nf4_grouped_gemm`, computes rows of `A @ W_e^T` where W_e is an NF4 weight
`packed [E, N, Kd/2]` + `absmax [E, N, Kd/64]`; each program owns BM sorted rows of one
expert and BN output columns and decodes its weight tile in registers (4.5 bits read per
weight, never a dequantised copy in memory). It runs twice per MoE layer:

1. gate+up: A = x rows (pair // K), two weights, epilogue silu(g) * u -> act [P, I];
2. down:    A = act rows (pair),      one weight, epilogue * routing weight -> [P, H] fp32,
   then the K rows of each token are summed in fp32 (spec: fp32 accumulation).

No host synchronisation: idle blocks read the padded row count from device memory and
return, so the launch grid depends only on T, K, E and the tile sizes. Under
`TRITON_INTERPRET=1` (CPU tests) tiles are multiplied in fp32: the interpreter's bf16
`tl.dot` is wrong.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from kimivl_cli.kernels.align import Alignment, align_tokens
from kimivl_cli.quant.nf4 import nf4_code

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


@triton.jit
def _nf4_tile(packed_ptr, absmax_ptr, code_ptr, cols, ks, col_mask, stride_pn, stride_an):
    """Dequantised weight tile W[cols, ks] -> [BN, BK] fp32 (high nibble = even k)."""
    byte = tl.load(packed_ptr + cols[:, None] * stride_pn + ks[None, :] // 2, mask=col_mask[:, None], other=0)
    nibble = (byte.to(tl.int32) >> (((ks[None, :] + 1) % 2) * 4)) & 0xF
    level = tl.load(code_ptr + nibble)
    scale = tl.load(absmax_ptr + cols[:, None] * stride_an + ks[None, :] // 64, mask=col_mask[:, None], other=0.0)
    return level * scale


@triton.jit
def _nf4_grouped_gemm(
    a_ptr,
    out_ptr,
    packed_ptr,
    absmax_ptr,
    packed2_ptr,
    absmax2_ptr,
    code_ptr,
    sorted_pairs_ptr,
    block_expert_ptr,
    num_padded_ptr,
    route_w_ptr,
    n_pairs,
    N,
    KD,
    stride_a,
    stride_out,
    stride_pe,
    stride_pn,
    stride_ae,
    stride_an,
    A_ROW_DIV: tl.constexpr,
    GATED: tl.constexpr,
    APPLY_WEIGHT: tl.constexpr,
    DOT_FP32: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    if pid_m * BLOCK_M >= tl.load(num_padded_ptr):
        return
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    pair = tl.load(sorted_pairs_ptr + rows)
    row_mask = pair < n_pairs
    a_row = (pair // A_ROW_DIV).to(tl.int64)
    expert = tl.load(block_expert_ptr + pid_m).to(tl.int64)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_mask = cols < N
    w_ptr = packed_ptr + expert * stride_pe
    s_ptr = absmax_ptr + expert * stride_ae
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc2 = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, KD, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        a = tl.load(a_ptr + a_row[:, None] * stride_a + ks[None, :], mask=row_mask[:, None], other=0.0)
        w = _nf4_tile(w_ptr, s_ptr, code_ptr, cols, ks, col_mask, stride_pn, stride_an)
        if DOT_FP32:
            acc += tl.dot(a.to(tl.float32), tl.trans(w))
        else:
            acc += tl.dot(a, tl.trans(w.to(a.dtype)))
        if GATED:
            w2 = _nf4_tile(
                packed2_ptr + expert * stride_pe, absmax2_ptr + expert * stride_ae, code_ptr, cols, ks, col_mask,
                stride_pn, stride_an,
            )  # fmt: skip
            if DOT_FP32:
                acc2 += tl.dot(a.to(tl.float32), tl.trans(w2))
            else:
                acc2 += tl.dot(a, tl.trans(w2.to(a.dtype)))
    if GATED:
        acc = acc * tl.sigmoid(acc) * acc2
    if APPLY_WEIGHT:
        acc = acc * tl.load(route_w_ptr + pair, mask=row_mask, other=0.0)[:, None]
    out = out_ptr + pair.to(tl.int64)[:, None] * stride_out + cols[None, :]
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=row_mask[:, None] & col_mask[None, :])


def _pick_tiles(rows_per_expert: float) -> tuple[int, int, int]:
    """(BM, BN, BK): small BM for decode (few rows per expert), larger tiles for prefill."""
    if rows_per_expert <= 16:
        return 16, 64, 64
    if rows_per_expert <= 64:
        return 32, 64, 64
    return 64, 128, 64


def _launch(
    a: torch.Tensor,
    out: torch.Tensor,
    packed: torch.Tensor,
    absmax: torch.Tensor,
    align: Alignment,
    n_pairs: int,
    a_row_div: int,
    tiles: tuple[int, int, int],
    packed2: torch.Tensor | None = None,
    absmax2: torch.Tensor | None = None,
    route_w: torch.Tensor | None = None,
) -> None:
    """out[pair] = epilogue(a[pair // a_row_div] @ W_e^T) for every aligned pair (see module doc)."""
    block_m, block_n, block_k = tiles
    n, kd = packed.shape[1], packed.shape[2] * 2
    if kd % block_k:
        raise ValueError(f"inner dimension {kd} must be a multiple of BLOCK_K {block_k}")
    grid = (align.sorted_pairs.numel() // block_m, triton.cdiv(n, block_n))
    _nf4_grouped_gemm[grid](
        a, out, packed, absmax,
        packed if packed2 is None else packed2, absmax if absmax2 is None else absmax2,
        nf4_code(a.device), align.sorted_pairs, align.block_expert, align.num_padded,
        out if route_w is None else route_w,
        n_pairs, n, kd,
        a.stride(0), out.stride(0), packed.stride(0), packed.stride(1), absmax.stride(0), absmax.stride(1),
        A_ROW_DIV=a_row_div, GATED=packed2 is not None, APPLY_WEIGHT=route_w is not None, DOT_FP32=_INTERPRET,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
    )  # fmt: skip


def fused_moe_nf4(
    x: torch.Tensor,
    idx: torch.Tensor,
    weights: torch.Tensor,
    gate: tuple[torch.Tensor, torch.Tensor],
    up: tuple[torch.Tensor, torch.Tensor],
    down: tuple[torch.Tensor, torch.Tensor],
) -> torch.Tensor:
    """Routed experts on NF4 weights: x [T, H], idx/weights [T, K] -> [T, H] in x.dtype.

    gate/up: (packed [E, I, H/2], absmax [E, I, H/64]); down: (packed [E, H, I/2], absmax [E, H, I/64]).
    Memory: act [P, I] in x.dtype plus [P, H] fp32 partial outputs.
    """
    t, k = idx.shape
    e, inter, _ = gate[0].shape
    hidden = down[0].shape[1]
    tiles = _pick_tiles(t * k / e)
    align = align_tokens(idx, e, tiles[0])
    pairs = t * k
    x = x.contiguous()
    act = torch.empty(pairs, inter, dtype=x.dtype, device=x.device)
    _launch(x, act, gate[0], gate[1], align, pairs, k, tiles, packed2=up[0], absmax2=up[1])
    partial = torch.empty(pairs, hidden, dtype=torch.float32, device=x.device)
    route_w = weights.reshape(-1).float().contiguous()
    _launch(act, partial, down[0], down[1], align, pairs, 1, tiles, route_w=route_w)
    return partial.view(t, k, hidden).sum(dim=1).to(x.dtype)


def nf4_matmul(x: torch.Tensor, packed: torch.Tensor, absmax: torch.Tensor) -> torch.Tensor:
    """Dense NF4 linear: x [..., Kd] @ W^T with W = (packed [N, Kd/2], absmax [N, Kd/64]) -> [..., N].

    The grouped kernel with one expert and the identity alignment (built on device, no sync).
    """
    flat = x.reshape(-1, x.shape[-1]).contiguous()
    m = flat.shape[0]
    tiles = _pick_tiles(m)
    rows = -(-m // tiles[0]) * tiles[0]
    ids = torch.arange(rows, dtype=torch.int32, device=x.device).clamp_(max=m)
    align = Alignment(
        ids,
        torch.zeros(rows // tiles[0], dtype=torch.int32, device=x.device),
        torch.full((1,), rows, dtype=torch.int32, device=x.device),
        tiles[0],
    )
    out = torch.empty(m, packed.shape[0], dtype=x.dtype, device=x.device)
    _launch(flat, out, packed.unsqueeze(0), absmax.unsqueeze(0), align, m, 1, tiles)
    return out.view(*x.shape[:-1], packed.shape[0])
