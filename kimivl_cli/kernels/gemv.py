"""Decode GEMVs for one to a few rows, NF4 or dense weights, at the memory roofline (Triton).

Shapes: M input rows (tokens), K inner, N output rows, BN rows per program, NB 64-weight blocks
per loop step. A weight is either dense `[N, K]` (bf16/fp32) or NF4 `(packed [N, K/2] uint8,
absmax [N, K/64] fp32)` (see weight_formats.py).

Batch-1 decode reads every weight once and does two flops per weight, so a GEMV is bound by
how fast its program grid streams the weight. Each program owns BN output rows and the whole K
(no split-K, so no second pass or atomics): BN is picked so the grid has at least
`MIN_PROGRAMS` programs (two waves on a 132-SM H100/H200) for every Kimi-VL shape, and a loop
step covers BN x NB blocks, 64 weights per thread, all loads issued before any use.

The inner tile is [BN, NB, 8, 4] *pairs* of weights: a thread's 4 adjacent pairs are 4 bytes of
NF4 codes and 16 bytes of bf16 x, so the code tile and the x tile share one register layout.
(16-byte code loads would put 16 pairs, 64 bytes of x, in a thread; Triton loads x 16 bytes at
a time in its own layout and converts it through shared memory with ~16 barriers per step.)
Codes map to levels through `tl.gather` on the 16 levels, built once per program from constants
(no table in memory, nothing copied to the device) and staged by Triton in shared memory: one
conflict-free LDS per weight instead of a global load with a 64-bit address or a 16-way select,
7-8 SASS instructions per NF4 weight in all (AOT-compiled for sm_90). The absmax is loaded once
per 64-block and applied once per pair.

Fused around the product, all optional: an RMSNorm of x as prologue (the layer norm before
attention or the MLP), a second weight either stacked (q_proj + kv_a_proj: one launch, two
outputs) or gated (gate + up with silu(g) * u as epilogue), and a residual add as epilogue.
Rounding follows the module path: the norm, each product and the residual sum round to x's
dtype, as `RMSNorm`, `Linear` and `x + f(x)` do.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from kimivl_cli.kernels.moe_triton import _nf4_level
from kimivl_cli.weight_formats import BLOCKSIZE, NF4Tensor, dequantize_nf4

Weight = torch.Tensor | tuple[torch.Tensor, torch.Tensor]  # dense [N, K] or NF4 (packed, absmax)
Norm = tuple[torch.Tensor, float]  # RMSNorm weight [K], eps

MIN_PROGRAMS = 264  # two waves of 132 SMs (H100/H200); smaller chips only get more waves
PAIRS_PER_STEP = 128  # BN x NB: with 4 warps, 32 pairs (64 weights) per thread per loop step
_PLAIN, _STACKED, _GATED = 0, 1, 2


@triton.jit
def unpair(words, DT: tl.constexpr):
    """Two adjacent `DT` values packed in one word (int32 for 16-bit, int64 for fp32) -> (even, odd) fp32.

    Kernels read x and dense weights as such pairs, in the layout of the NF4 code bytes (one byte
    holds the codes of k = 2j, 2j + 1), so no tile changes layout through shared memory per step.
    """
    if DT == tl.bfloat16:  # noqa: SIM300 (DT is the argument)
        return (words << 16).to(tl.float32, bitcast=True), (words & -65536).to(tl.float32, bitcast=True)
    elif DT == tl.float16:  # noqa: SIM300
        lo = (words & 0xFFFF).to(tl.int16).to(tl.float16, bitcast=True)
        return lo.to(tl.float32), (words >> 16).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
    else:
        lo = words.to(tl.int32).to(tl.float32, bitcast=True)
        return lo, (words >> 32).to(tl.int32).to(tl.float32, bitcast=True)


@triton.jit
def pair_index(blocks):
    """Pair offsets of 64-weight blocks as [NB, 8, 4]: a thread's four adjacent pairs are one 4-byte
    load of NF4 codes and one 16-byte load of bf16 x (the largest tiles whose layouts agree)."""
    q = tl.arange(0, 8)[None, :, None] * 4
    return blocks[:, None, None] * 32 + q + tl.arange(0, 4)[None, None, :]


@triton.jit
def nf4_levels():
    """The 16 NF4 levels as a [16] register tensor, built from constants once per program (no table
    in memory, nothing to copy to the device), for `lookup`."""
    return _nf4_level(tl.arange(0, 16))


@triton.jit
def lookup(levels, codes):
    """levels[codes] for an int tensor of 4-bit codes: a shuffle/shared-memory gather, no global load."""
    return tl.reshape(tl.gather(levels, tl.reshape(codes, [codes.numel]), 0), codes.shape)


@triton.jit
def rms_rstd(x_pairs, K, eps, DT: tl.constexpr, BLOCK: tl.constexpr):
    """1 / sqrt(mean(x^2) + eps) of one row of K values read as K/2 pairs, in fp32."""
    ss = tl.zeros([BLOCK], tl.float32)
    for p0 in range(0, K // 2, BLOCK):
        ps = p0 + tl.arange(0, BLOCK)
        even, odd = unpair(tl.load(x_pairs + ps, mask=ps < K // 2, other=0), DT)
        ss += even * even + odd * odd
    return 1.0 / tl.sqrt(tl.sum(ss, axis=0) / K + eps)


@triton.jit
def _norm_apply(x, w, rstd, DT: tl.constexpr):
    """RMSNorm's roundings: round(w * round(x * rstd)) in DT, returned as fp32."""
    return (w * (x * rstd).to(DT).to(tl.float32)).to(DT).to(tl.float32)


@triton.jit
def input_tile(x_pairs, norm_pairs, blocks, blk_ok, rstd, DT: tl.constexpr, NORM: tl.constexpr):
    """x at `pair_index(blocks)` as fp32 (even, odd) [NB, 8, 4]; with NORM, after the RMSNorm."""
    ps = pair_index(blocks)
    even, odd = unpair(tl.load(x_pairs + ps, mask=blk_ok[:, None, None], other=0), DT)
    if NORM:
        w_even, w_odd = unpair(tl.load(norm_pairs + ps, mask=blk_ok[:, None, None], other=0), DT)
        even, odd = _norm_apply(even, w_even, rstd, DT), _norm_apply(odd, w_odd, rstd, DT)
    return even, odd


@triton.jit
def weight_pairs(words, levels, NF4: tl.constexpr, WDT: tl.constexpr):
    """Loaded weight words -> (even, odd) fp32: NF4 code bytes (high nibble = even k) to levels, before
    the absmax; dense pair words (`unpair`) to values."""
    if NF4:
        byte = words.to(tl.int32)
        return tl.split(lookup(levels, tl.join(byte >> 4, byte & 0xF)))
    else:
        return unpair(words, WDT)


@triton.jit
def weight_tile(w_ptr, s_ptr, levels, rows, blocks, mask, stride_wn, stride_sn, NF4: tl.constexpr, WDT: tl.constexpr):
    """W[rows] at `pair_index(blocks)`: (even, odd) [BN, NB, 8, 4] and the absmax [BN, NB, 1, 1] (1.0
    for dense weights); masked entries 0, rows int64, stride_wn in bytes (NF4) or words (dense)."""
    offs = rows[:, None, None, None] * stride_wn + pair_index(blocks)[None, :, :, :]
    words = tl.load(w_ptr + offs, mask=mask[:, :, None, None], other=0, eviction_policy="evict_first")
    even, odd = weight_pairs(words, levels, NF4, WDT)
    if NF4:
        scale = tl.load(s_ptr + rows[:, None] * stride_sn + blocks[None, :], mask=mask, other=0.0)
        return even, odd, scale[:, :, None, None]
    else:
        return even, odd, 1.0


@triton.jit
def dot_tile(
    w_ptr, s_ptr, levels, rows, blocks, mask, stride_wn, stride_sn, x_even, x_odd, NF4: tl.constexpr, WDT: tl.constexpr
):
    """W[rows] . x over one step's blocks, per pair: [BN, NB, 8, 4] fp32 to accumulate."""
    w_even, w_odd, scale = weight_tile(w_ptr, s_ptr, levels, rows, blocks, mask, stride_wn, stride_sn, NF4, WDT)
    return (w_even * x_even + w_odd * x_odd) * scale


@triton.jit
def row_sums(acc, BN: tl.constexpr):
    """[BN, NB, 8, 4] per-pair partial products -> [BN] dot products."""
    return tl.sum(tl.reshape(acc, [BN, acc.numel // BN]), axis=1)


@triton.jit
def row_dots(
    x_row, norm_ptr, rstd, w_ptr, s_ptr, w2_ptr, s2_ptr, levels, rows, row_ok, K,
    stride_wn, stride_sn, stride_w2n, stride_s2n,
    DT: tl.constexpr, WDT: tl.constexpr, NF4: tl.constexpr, NORM: tl.constexpr, TWO: tl.constexpr,
    BN: tl.constexpr, NB: tl.constexpr,
):  # fmt: skip
    """(W[rows] . x, W2[rows] . x) [BN] each rounded to DT (W2 only with TWO, else zeros): the GEMV
    loop over K in steps of NB blocks; x read as pairs, after the RMSNorm with NORM; rows int64."""
    n_blocks = K // 64
    acc = tl.zeros([BN, NB, 8, 4], tl.float32)
    acc2 = tl.zeros([BN, NB, 8, 4], tl.float32)
    for b0 in range(0, n_blocks, NB):
        blocks = b0 + tl.arange(0, NB)
        blk_ok = blocks < n_blocks
        x_even, x_odd = input_tile(x_row, norm_ptr, blocks, blk_ok, rstd, DT, NORM)
        x_even, x_odd = x_even[None, :, :, :], x_odd[None, :, :, :]
        mask = row_ok[:, None] & blk_ok[None, :]
        acc += dot_tile(w_ptr, s_ptr, levels, rows, blocks, mask, stride_wn, stride_sn, x_even, x_odd, NF4, WDT)
        if TWO:
            acc2 += dot_tile(
                w2_ptr, s2_ptr, levels, rows, blocks, mask, stride_w2n, stride_s2n, x_even, x_odd, NF4, WDT
            )
    return row_sums(acc, BN).to(DT).to(tl.float32), row_sums(acc2, BN).to(DT).to(tl.float32)


@triton.jit
def swiglu(gate, up, DT: tl.constexpr):
    """silu(gate) * up with the module ops' roundings to DT (fp32 in, fp32 out)."""
    return (gate * tl.sigmoid(gate)).to(DT).to(tl.float32) * up


@triton.jit
def _gemv_kernel(
    x_ptr, out_ptr, w_ptr, s_ptr, w2_ptr, s2_ptr, out2_ptr, norm_ptr, res_ptr,
    N, N2, K, eps,
    stride_xm, stride_om, stride_o2m, stride_rm, stride_wn, stride_sn, stride_w2n, stride_s2n,
    DT: tl.constexpr, WDT: tl.constexpr, NF4: tl.constexpr, NORM: tl.constexpr, MODE: tl.constexpr,
    RESIDUAL: tl.constexpr, BN: tl.constexpr, NB: tl.constexpr, NORM_BLOCK: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    m = tl.program_id(1).to(tl.int64)
    x_row = x_ptr + m * stride_xm
    rstd = rms_rstd(x_row, K, eps, DT, NORM_BLOCK) if NORM else 1.0
    levels = nf4_levels() if NF4 else 0.0
    n_rows = N
    out_row = out_ptr + m * stride_om
    if MODE == 1:  # stacked: the programs past the first weight's rows run the second weight
        first = tl.cdiv(N, BN)
        if pid >= first:
            pid -= first
            w_ptr, s_ptr, stride_wn, stride_sn = w2_ptr, s2_ptr, stride_w2n, stride_s2n
            out_row = out2_ptr + m * stride_o2m
            n_rows = N2
    rows = pid * BN + tl.arange(0, BN)
    row_ok = rows < n_rows
    y, u = row_dots(
        x_row, norm_ptr, rstd, w_ptr, s_ptr, w2_ptr, s2_ptr, levels, rows.to(tl.int64), row_ok, K,
        stride_wn, stride_sn, stride_w2n, stride_s2n, DT, WDT, NF4, NORM, MODE == 2, BN, NB,
    )  # fmt: skip
    if MODE == 2:
        y = swiglu(y, u, DT)
    if RESIDUAL:
        y = y.to(DT).to(tl.float32) + tl.load(res_ptr + m * stride_rm + rows, mask=row_ok, other=0.0).to(tl.float32)
    tl.store(out_row + rows, y.to(DT).to(out_ptr.dtype.element_ty), mask=row_ok)


_PAIR = {torch.bfloat16: torch.int32, torch.float16: torch.int32, torch.float32: torch.int64}
_TL = {torch.bfloat16: tl.bfloat16, torch.float16: tl.float16, torch.float32: tl.float32}


def pairs(t: torch.Tensor) -> torch.Tensor:
    """A [..., K] bf16/fp16/fp32 tensor viewed as [..., K/2] words of two values (what kernels read)."""
    if t.dtype not in _PAIR:
        raise ValueError(f"decode kernels take bf16, fp16 or fp32 tensors, not {t.dtype}")
    return t.view(_PAIR[t.dtype])


def tl_dtype(dtype: torch.dtype) -> tl.dtype:
    return _TL[dtype]


def is_nf4(weight: Weight) -> bool:
    return isinstance(weight, tuple)


def weight_shape(weight: Weight) -> tuple[int, int]:
    """(N, K) of a dense or NF4 weight."""
    if is_nf4(weight):
        return weight[0].shape[-2], weight[0].shape[-1] * 2
    return weight.shape[-2], weight.shape[-1]


def codes(weight: Weight) -> torch.Tensor:
    """What a kernel reads per pair of weights: NF4 code bytes, or dense values as `pairs`."""
    return weight[0] if is_nf4(weight) else pairs(weight)


def scales(weight: Weight) -> torch.Tensor:
    """The NF4 absmax (a dense weight has none: its own pairs stand in as an unused pointer)."""
    return weight[1] if is_nf4(weight) else codes(weight)


def strides(weight: Weight, dim: int = -2) -> tuple[int, int]:
    """Strides of `codes` and `scales` along `dim` (-2: rows; 0: experts of a stack), in their elements."""
    return codes(weight).stride(dim), scales(weight).stride(dim)


def gemv_tiles(n: int, k: int, device: torch.device) -> tuple[int, int, int]:
    """(BN, NB, num_warps) for N rows of K: the most rows per program (up to 8) that still gives
    `MIN_PROGRAMS` programs, and NB blocks per step so each thread handles 32 pairs per step.

    On CPU (the Triton interpreter, which runs programs one by one) the fewest programs.
    """
    min_programs = MIN_PROGRAMS if device.type == "cuda" else 1
    bn = 8
    while bn > 1 and triton.cdiv(n, bn) < min_programs:
        bn //= 2
    blocks = k // BLOCKSIZE
    nb = min(PAIRS_PER_STEP // bn, triton.next_power_of_2(blocks))
    # fewer, fuller steps when the last step would be mostly masked (K = 1,408 is 22 blocks)
    while nb > 1 and (-blocks) % nb > nb // 2:
        nb //= 2
    return bn, nb, max(1, min(4, bn * nb // 32))


def _launch(
    x: torch.Tensor,
    out: torch.Tensor,
    w: Weight,
    mode: int,
    w2: Weight | None = None,
    out2: torch.Tensor | None = None,
    norm: Norm | None = None,
    residual: torch.Tensor | None = None,
    tiles: tuple[int, int, int] | None = None,
) -> None:
    nf4 = is_nf4(w)
    n, k = weight_shape(w)
    if k % BLOCKSIZE or k != x.shape[-1]:
        raise ValueError(f"gemv: inner size {k} must equal x's {x.shape[-1]} and be a multiple of {BLOCKSIZE}")
    n2 = weight_shape(w2)[0] if w2 is not None else 0
    bn, nb, warps = tiles or gemv_tiles(n + n2 if mode == _STACKED else n, k, x.device)
    programs = triton.cdiv(n, bn) + (triton.cdiv(n2, bn) if mode == _STACKED else 0)
    w2 = w if w2 is None else w2
    out2 = out if out2 is None else out2
    res = out if residual is None else residual
    norm_w, eps = norm if norm is not None else (x, 0.0)
    xp = pairs(x)
    _gemv_kernel[(programs, x.shape[0])](
        xp, out, codes(w), scales(w), codes(w2), scales(w2), out2,
        pairs(norm_w), res,
        n, n2, k, eps,
        xp.stride(0), out.stride(0), out2.stride(0), res.stride(0), *strides(w), *strides(w2),
        DT=tl_dtype(x.dtype), WDT=tl.uint8 if nf4 else tl_dtype(w.dtype), NF4=nf4, NORM=norm is not None,
        MODE=mode, RESIDUAL=residual is not None, BN=bn, NB=nb, NORM_BLOCK=min(512, triton.next_power_of_2(k // 2)),
        num_warps=warps,
    )  # fmt: skip


def gemv(
    x: torch.Tensor,
    weight: Weight,
    norm: Norm | None = None,
    residual: torch.Tensor | None = None,
    out_dtype: torch.dtype | None = None,
    tiles: tuple[int, int, int] | None = None,
) -> torch.Tensor:
    """x [M, K] -> [M, N] = (residual +) rmsnorm?(x) @ W^T, rounded to x.dtype, stored as out_dtype."""
    out = torch.empty(x.shape[0], weight_shape(weight)[0], dtype=out_dtype or x.dtype, device=x.device)
    _launch(x, out, weight, _PLAIN, norm=norm, residual=residual, tiles=tiles)
    return out


def gemv_stacked(
    x: torch.Tensor, first: Weight, second: Weight, norm: Norm | None = None, tiles: tuple[int, int, int] | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Two GEMVs of the same input in one launch: (x @ W1^T [M, N1], x @ W2^T [M, N2])."""
    if is_nf4(first) != is_nf4(second) or codes(first).dtype != codes(second).dtype:
        raise ValueError("gemv_stacked: both weights must have the same format")
    a = torch.empty(x.shape[0], weight_shape(first)[0], dtype=x.dtype, device=x.device)
    b = torch.empty(x.shape[0], weight_shape(second)[0], dtype=x.dtype, device=x.device)
    _launch(x, a, first, _STACKED, w2=second, out2=b, norm=norm, tiles=tiles)
    return a, b


def gemv_swiglu(
    x: torch.Tensor, gate: Weight, up: Weight, norm: Norm | None = None, tiles: tuple[int, int, int] | None = None
) -> torch.Tensor:
    """x [M, K] -> silu(x @ G^T) * (x @ U^T) [M, N] (the SwiGLU hidden), after an optional RMSNorm."""
    if weight_shape(gate) != weight_shape(up):
        raise ValueError("gemv_swiglu: gate and up must have the same shape")
    out = torch.empty(x.shape[0], weight_shape(gate)[0], dtype=x.dtype, device=x.device)
    _launch(x, out, gate, _GATED, w2=up, norm=norm, tiles=tiles)
    return out


# --- PyTorch references -------------------------------------------------------------------------


def dense(weight: Weight, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The weight as a dense [N, K] tensor (NF4 dequantised)."""
    if is_nf4(weight):
        return dequantize_nf4(NF4Tensor(weight[0], weight[1], dtype), dtype)
    return weight.to(dtype)


def rms_norm_reference(x: torch.Tensor, norm: Norm) -> torch.Tensor:
    """`RMSNorm.forward`: normalise in fp32, round to x's dtype, scale by the weight (rounded)."""
    weight, eps = norm
    return (weight.float() * F.rms_norm(x.float(), (x.shape[-1],), eps=eps).to(x.dtype).float()).to(x.dtype)


def gemv_reference(
    x: torch.Tensor,
    weight: Weight,
    norm: Norm | None = None,
    residual: torch.Tensor | None = None,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """What `gemv` computes, in plain PyTorch (fp32 products, the same roundings)."""
    h = rms_norm_reference(x, norm) if norm is not None else x
    y = (h.float() @ dense(weight).t()).to(x.dtype)
    if residual is not None:
        y = (residual.float() + y.float()).to(x.dtype)
    return y.to(out_dtype or x.dtype)


def swiglu_reference(x: torch.Tensor, gate: Weight, up: Weight, norm: Norm | None = None) -> torch.Tensor:
    """What `gemv_swiglu` computes: silu(gate(x)) * up(x) with module-path roundings."""
    g, u = gemv_reference(x, gate, norm), gemv_reference(x, up, norm)
    return (F.silu(g.float()).to(x.dtype).float() * u.float()).to(x.dtype)
