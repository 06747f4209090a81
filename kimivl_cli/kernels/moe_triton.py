"""Triton grouped GEMM with the weights decoded in registers: the fused MoE and dense NF4 linears on GPU.

Shapes: T tokens, H hidden, I expert intermediate, E experts, K experts per token,
P = T*K (token, expert) pairs, S padded rows (see `align.py`), BM/BN tile sizes, BK = 64.

One kernel, `_grouped_gemm`, computes rows of `A @ W_e^T` for a weight W_e that is either NF4
(`packed [E, N, Kd/2]` + `absmax [E, N, Kd/64]`, 4.5 bits read per weight, never a dequantised copy
in memory) or plain (`[E, N, Kd]` in the model's dtype: the bf16 experts). Each program owns BM
rows of one expert and BN output columns. It runs twice per MoE layer:

1. gate+up: A = x rows (pair // K), two weights, epilogue silu(g) * u -> act [P, I];
2. down:    A = act rows (pair),      one weight, epilogue * routing weight -> [P, H] fp32,
   then the K rows of each token are summed in fp32.

A dense NF4 linear is the same kernel with one expert and rows in order (no alignment).

Shared memory: BK is one NF4 block, so a K step needs one absmax per output column (a [BN]
vector), and the 16 NF4 levels come from a select tree in registers: only A, the codes and the
absmax are staged through shared memory. `launch_config` picks tiles and pipeline stages that fit
sm_86/sm_89's 99 KB (the smallest of sm_80..sm_90) at every row count; tests/gpu compiles every
configuration for sm_80/86/89/90 and checks it.

Products: half-precision activations multiply half-precision weights (an NF4 weight is
level * absmax in fp32, rounded once, like `dequantize_nf4`) on tensor cores with fp32
accumulation; fp32 activations use `input_precision="ieee"` (exact fp32 products, no TF32).
The interpreter's bf16 `tl.dot` is wrong and its bf16 casts truncate, so under
`TRITON_INTERPRET=1` the operands are rounded to nearest even as on the GPU and multiplied in
fp32: the same exact products.

No host synchronisation, no table or other host data per launch: idle blocks read the padded row
count from device memory and return, so the grid depends only on T, K, E and the tiles.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from kimivl_cli.kernels.align import Alignment, align_tokens
from kimivl_cli.kernels.moe import ExpertWeights
from kimivl_cli.weight_formats import BLOCKSIZE

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
BLOCK_K = BLOCKSIZE  # one NF4 absmax block per K step
# Shared memory the pipeline may fill: sm_86/sm_89 give a block 101,376 B (sm_80 166,912, sm_90
# 232,448); the rest is headroom for the layout conversions Triton adds.
SHARED_BUDGET = 80 * 1024

# A weight: a plain tensor [E, N, Kd] (or [N, Kd]), or NF4 (packed [E, N, Kd/2], absmax [E, N, Kd/64]).
Weight = torch.Tensor | tuple[torch.Tensor, torch.Tensor]


@triton.jit
def _nf4_level(code):
    """NF4_LEVELS[code] for 4-bit codes, by a select tree in registers (no table in memory)."""
    b0 = (code & 1) != 0
    b1 = (code & 2) != 0
    b2 = (code & 4) != 0
    low = tl.where(
        b2,
        tl.where(b1, tl.where(b0, 0.0, -0.09105003625154495), tl.where(b0, -0.18477343022823334, -0.28444138169288635)),
        tl.where(b1, tl.where(b0, -0.39491748809814453, -0.5250730514526367), tl.where(b0, -0.6961928009986877, -1.0)),
    )
    high = tl.where(
        b2,
        tl.where(b1, tl.where(b0, 1.0, 0.7229568362236023), tl.where(b0, 0.5626170039176941, 0.44070982933044434)),
        tl.where(b1, tl.where(b0, 0.33791524171829224, 0.24611230194568634), tl.where(b0, 0.16093020141124725, 0.07958029955625534)),
    )  # fmt: skip
    return tl.where(code >= 8, high, low)


@triton.jit
def _cast(x, dtype: tl.constexpr, INTERPRET: tl.constexpr):
    """x.to(dtype), rounding to nearest even as the GPU does (the interpreter truncates to bf16)."""
    if INTERPRET and dtype == tl.bfloat16:
        bits = x.to(tl.float32).to(tl.int32, bitcast=True)
        x = ((bits + 0x7FFF + ((bits >> 16) & 1)) & -65536).to(tl.float32, bitcast=True)
    return x.to(dtype)


@triton.jit
def _dot(acc, a, w, INTERPRET: tl.constexpr):
    """acc + a [BM, k] @ w [BN, k]^T with the GPU's products (see the module doc)."""
    if a.dtype == tl.float32:
        return tl.dot(a, tl.trans(w.to(tl.float32)), acc, input_precision="ieee")
    w = _cast(w, a.dtype, INTERPRET)
    if INTERPRET:
        return tl.dot(a.to(tl.float32), tl.trans(w.to(tl.float32)), acc, input_precision="ieee")
    return tl.dot(a, tl.trans(w), acc)


@triton.jit
def _accumulate(acc, a_ptr, a_rows, row_mask, stride_a, w_ptr, s_ptr, cols, col_mask, stride_wn, stride_sn, k0,
                NF4: tl.constexpr, INTERPRET: tl.constexpr, BLOCK_K: tl.constexpr):  # fmt: skip
    """acc + A[rows, k0:k0+BK] @ W[cols, k0:k0+BK]^T."""
    if NF4:
        # Byte j of a row holds weights 2j (high nibble) and 2j+1: multiply even and odd k apart.
        half = k0 // 2 + tl.arange(0, BLOCK_K // 2)
        byte = tl.load(w_ptr + cols[:, None] * stride_wn + half[None, :], mask=col_mask[:, None], other=0).to(tl.int32)
        scale = tl.load(s_ptr + cols * stride_sn + k0 // BLOCK_K, mask=col_mask, other=0.0)[:, None]
        a_even = tl.load(a_ptr + a_rows[:, None] * stride_a + 2 * half[None, :], mask=row_mask[:, None], other=0.0)
        a_odd = tl.load(a_ptr + a_rows[:, None] * stride_a + 2 * half[None, :] + 1, mask=row_mask[:, None], other=0.0)
        acc = _dot(acc, a_even, _nf4_level(byte >> 4) * scale, INTERPRET)
        acc = _dot(acc, a_odd, _nf4_level(byte & 0xF) * scale, INTERPRET)
    else:
        ks = k0 + tl.arange(0, BLOCK_K)
        w = tl.load(w_ptr + cols[:, None] * stride_wn + ks[None, :], mask=col_mask[:, None], other=0.0)
        a = tl.load(a_ptr + a_rows[:, None] * stride_a + ks[None, :], mask=row_mask[:, None], other=0.0)
        acc = _dot(acc, a, w, INTERPRET)
    return acc


@triton.jit
def _grouped_gemm(
    a_ptr,
    out_ptr,
    w_ptr,
    s_ptr,
    w2_ptr,
    s2_ptr,
    sorted_pairs_ptr,
    block_expert_ptr,
    num_padded_ptr,
    route_w_ptr,
    n_rows,
    N,
    KD,
    stride_a,
    stride_out,
    stride_we,
    stride_wn,
    stride_se,
    stride_sn,
    A_ROW_DIV: tl.constexpr,
    ALIGNED: tl.constexpr,
    NF4: tl.constexpr,
    GATED: tl.constexpr,
    APPLY_WEIGHT: tl.constexpr,
    INTERPRET: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    if ALIGNED:  # rows are (token, expert) pairs sorted by expert, one expert per block
        if pid_m * BLOCK_M >= tl.load(num_padded_ptr):
            return
        pair = tl.load(sorted_pairs_ptr + pid_m * BLOCK_M + tl.arange(0, BLOCK_M))
        expert = tl.load(block_expert_ptr + pid_m).to(tl.int64)
    else:  # a dense linear: rows in order, one weight
        pair = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        expert = 0
    row_mask = pair < n_rows
    a_rows = (pair // A_ROW_DIV).to(tl.int64)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_mask = cols < N
    w_ptr += expert * stride_we
    s_ptr += expert * stride_se
    w2_ptr += expert * stride_we
    s2_ptr += expert * stride_se
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc2 = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, KD, BLOCK_K):
        acc = _accumulate(acc, a_ptr, a_rows, row_mask, stride_a, w_ptr, s_ptr, cols, col_mask, stride_wn, stride_sn,
                          k0, NF4, INTERPRET, BLOCK_K)  # fmt: skip
        if GATED:
            acc2 = _accumulate(acc2, a_ptr, a_rows, row_mask, stride_a, w2_ptr, s2_ptr, cols, col_mask, stride_wn,
                               stride_sn, k0, NF4, INTERPRET, BLOCK_K)  # fmt: skip
    if GATED:
        acc = acc * tl.sigmoid(acc) * acc2
    if APPLY_WEIGHT:
        acc = acc * tl.load(route_w_ptr + pair, mask=row_mask, other=0.0)[:, None]
    out = out_ptr + pair.to(tl.int64)[:, None] * stride_out + cols[None, :]
    tl.store(out, _cast(acc, out_ptr.dtype.element_ty, INTERPRET), mask=row_mask[:, None] & col_mask[None, :])


@dataclass(frozen=True)
class LaunchConfig:
    block_m: int
    block_n: int
    num_stages: int
    num_warps: int


def stage_bytes(block_m: int, block_n: int, a_size: int, w_size: int | None, gated: bool) -> int:
    """Shared memory one pipeline buffer holds: the A tile and each weight's tile (codes + absmax
    for NF4, `w_size` None; else BN x BK elements of `w_size` bytes). S stages keep S - 1 buffers."""
    weight = block_n * (BLOCK_K // 2 + 4) if w_size is None else block_n * BLOCK_K * w_size
    return block_m * BLOCK_K * a_size + (2 if gated else 1) * weight


def tiles(rows_per_expert: float) -> tuple[int, int]:
    """(BM, BN): small BM for decode (few rows per expert), larger tiles for prefill."""
    if rows_per_expert <= 16:
        return 16, 64
    if rows_per_expert <= 64:
        return 32, 64
    return 64, 128


def launch_config(rows_per_expert: float, a_size: int, w_size: int | None, gated: bool) -> LaunchConfig:
    """`tiles` and the most pipeline stages (2-4) whose buffers fit SHARED_BUDGET with these element
    sizes (`w_size` None: NF4 weights)."""
    block_m, block_n = tiles(rows_per_expert)
    per_stage = stage_bytes(block_m, block_n, a_size, w_size, gated)
    warps = 8 if block_m * block_n >= 64 * 128 else 4  # big tiles: registers for the accumulators
    return LaunchConfig(block_m, block_n, num_stages=max(2, min(4, 1 + SHARED_BUDGET // per_stage)), num_warps=warps)


def _split(weight: Weight) -> tuple[torch.Tensor, torch.Tensor | None]:
    return weight if isinstance(weight, tuple) else (weight, None)


def _launch(
    a: torch.Tensor,
    out: torch.Tensor,
    weight: Weight,
    rows_per_expert: float,
    n_rows: int,
    align: Alignment | None = None,
    a_row_div: int = 1,
    weight2: Weight | None = None,
    route_w: torch.Tensor | None = None,
) -> None:
    """out[row] = epilogue(a[row // a_row_div] @ W_e^T) for every aligned pair, or every row in order
    when `align` is None (a dense linear). Weights are [E, N, .] stacks or a single [N, .] matrix."""
    w, s = _split(weight)
    w2, s2 = _split(weight2) if weight2 is not None else (w, s)
    nf4 = s is not None
    if w.dim() == 2:
        w, w2 = w.unsqueeze(0), w2.unsqueeze(0)
        s, s2 = (s.unsqueeze(0), s2.unsqueeze(0)) if nf4 else (s, s2)
    n, kd = w.shape[1], w.shape[2] * (2 if nf4 else 1)
    if kd % BLOCK_K:
        raise ValueError(f"inner dimension {kd} must be a multiple of {BLOCK_K}")
    if any(t.stride(-1) != 1 for t in (a, w, w2, *((s, s2) if nf4 else ()))):
        raise ValueError("activations and weights need a contiguous last dimension")
    cfg = launch_config(rows_per_expert, a.element_size(), None if nf4 else w.element_size(), weight2 is not None)
    if align is not None and align.block_m != cfg.block_m:
        raise ValueError(f"alignment made for BM {align.block_m}, the launch uses {cfg.block_m}")
    blocks_m = align.sorted_pairs.numel() // cfg.block_m if align else triton.cdiv(n_rows, cfg.block_m)
    scales, scales2 = (s, s2) if nf4 else (w, w2)  # unused without NF4: any pointer
    _grouped_gemm[(blocks_m, triton.cdiv(n, cfg.block_n))](
        a, out, w, scales, w2, scales2,
        *((align.sorted_pairs, align.block_expert, align.num_padded) if align else (out, out, out)),
        out if route_w is None else route_w,
        n_rows, n, kd,
        a.stride(0), out.stride(0), w.stride(0), w.stride(1), scales.stride(0), scales.stride(1),
        A_ROW_DIV=a_row_div, ALIGNED=align is not None, NF4=nf4, GATED=weight2 is not None,
        APPLY_WEIGHT=route_w is not None, INTERPRET=_INTERPRET,
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=BLOCK_K, num_stages=cfg.num_stages, num_warps=cfg.num_warps,
        enable_fp_fusion=True,  # Triton's default, stated (unstated, Triton 3.9 warns on stderr)
    )  # fmt: skip


def fused_moe(
    x: torch.Tensor,
    idx: torch.Tensor,
    weights: torch.Tensor,
    gate: ExpertWeights,
    up: ExpertWeights,
    down: ExpertWeights,
) -> torch.Tensor:
    """The GPU `MoEKernel` (`kernels/moe.py`): x [T, H], idx/weights [T, K] -> [T, H] in x.dtype, fp32 accumulation.

    gate/up: [E, I, H] or NF4 (packed [E, I, H/2], absmax [E, I, H/64]); down: [E, H, I] or NF4.
    Reads only the experts that received tokens. Memory: act [P, I] in x.dtype plus [P, H] fp32.
    """
    t, k = idx.shape
    e, inter = _split(gate)[0].shape[:2]
    hidden = _split(down)[0].shape[1]
    rows_per_expert = t * k / e
    align = align_tokens(idx, e, tiles(rows_per_expert)[0])
    pairs = t * k
    x = x.contiguous()
    act = torch.empty(pairs, inter, dtype=x.dtype, device=x.device)
    _launch(x, act, gate, rows_per_expert, pairs, align, a_row_div=k, weight2=up)
    partial = torch.empty(pairs, hidden, dtype=torch.float32, device=x.device)
    route_w = weights.reshape(-1).float().contiguous()
    _launch(act, partial, down, rows_per_expert, pairs, align, route_w=route_w)
    return partial.view(t, k, hidden).sum(dim=1).to(x.dtype)


def nf4_matmul(x: torch.Tensor, packed: torch.Tensor, absmax: torch.Tensor) -> torch.Tensor:
    """Dense NF4 linear: x [..., Kd] @ W^T with W = (packed [N, Kd/2], absmax [N, Kd/64]) -> [..., N]."""
    flat = x.reshape(-1, x.shape[-1]).contiguous()
    m = flat.shape[0]
    out = torch.empty(m, packed.shape[0], dtype=x.dtype, device=x.device)
    _launch(flat, out, (packed, absmax), m, m)
    return out.view(*x.shape[:-1], packed.shape[0])
