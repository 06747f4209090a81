"""Absorbed MLA attention for one decode token over the latent cache, in three launches (Triton).

Shapes: H heads, Dn/Dr/Dv nope/rope/value head dims, R kv_lora_rank, W = R + Dr cache row,
L attended slots (the position + 1, read on the device), S split programs, BL keys per step.
kv_b_proj's weight [H * (Dn + Dv), R] holds per head W_uk (its first Dn rows) and W_uv (the
next Dv rows); it stays NF4 (or dense) and is read in place, never dequantised to a copy.

1. `mla_prep`: q_lat[h] = q_nope[h] @ W_uk[h] (the query absorbed into latent space), RoPE of
   q_pe, and the token's cache row [rmsnorm(latent) | rope(k_pe)] written at its position.
2. `mla_attend`: split-K over the sequence: split s attends all heads (the M = 16 rows of its
   dots) over its slice of the L slots with an online softmax, and stores its unnormalised
   output [H, R] with its row max and sum. The split count follows L on the device (at most
   `MAX_SPLITS`, at least `MIN_SPLIT_KEYS` keys each), so the grid is static (CUDA graphs) while
   only the slots in use are read: with a 64K-slot cache at position 1K, 1K rows per layer.
3. `mla_out`: combines the splits of its head and applies W_uv: BN rows of the attention output
   [H * Dv], the o_proj input.

Products: tl.dot in the cache's dtype with fp32 accumulation (bf16 on tensor cores; fp32
caches multiply in IEEE fp32, never TF32). Under the interpreter the dots run in fp32.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from kimivl_cli.kernels.gemv import (
    Norm,
    Weight,
    codes,
    dense,
    is_nf4,
    nf4_levels,
    pair_index,
    rms_norm_reference,
    row_sums,
    scales,
    strides,
    tl_dtype,
    weight_tile,
)
from kimivl_cli.weight_formats import BLOCKSIZE

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
MAX_SPLITS = 64
MIN_SPLIT_KEYS = 128
BLOCK_KEYS = 32


@dataclass(frozen=True)
class MLAShape:
    heads: int
    rank: int  # R
    nope: int  # Dn
    rope: int  # Dr
    v: int  # Dv
    scale: float  # softmax scale (YaRN mscale included)


@dataclass(frozen=True)
class MLALayer:
    """What one layer's absorbed attention needs besides the token: kv_a_layernorm, kv_b_proj's
    weight [H * (Dn + Dv), R], the RoPE frequencies [Dr/2] and YaRN's cos/sin scale, the shapes."""

    kv_norm: Norm
    kv_b: Weight
    inv_freq: torch.Tensor
    mscale: float
    shape: MLAShape


@triton.jit
def _rope(x_ptr, pos, inv_freq_ptr, mscale, DR: tl.constexpr, DR_PAD: tl.constexpr):
    """One rope vector [Dr] (pairs x[2j], x[2j+1]) rotated by pos * inv_freq[j] -> (first, second half) fp32,
    de-interleaved like `apply_rope`."""
    j = tl.arange(0, DR_PAD // 2)
    ok = j < DR // 2
    a = tl.load(x_ptr + 2 * j, mask=ok, other=0.0).to(tl.float32)
    b = tl.load(x_ptr + 2 * j + 1, mask=ok, other=0.0).to(tl.float32)
    angle = pos.to(tl.float32) * tl.load(inv_freq_ptr + j, mask=ok, other=0.0)
    cos, sin = tl.cos(angle) * mscale, tl.sin(angle) * mscale
    return a * cos - b * sin, b * cos + a * sin


@triton.jit
def _split_plan(pos_ptr, S_MAX: tl.constexpr, MIN_KEYS: tl.constexpr, BL: tl.constexpr):
    """(slots L, splits in use, keys per split) for the token at the position stored on the device."""
    length = tl.load(pos_ptr).to(tl.int32) + 1
    n_split = tl.minimum(tl.cdiv(length, MIN_KEYS), S_MAX)
    chunk = tl.cdiv(tl.cdiv(length, n_split), BL) * BL
    return length, n_split, chunk


@triton.jit
def _mla_prep_kernel(
    q_ptr, kv_ptr, kv_norm_ptr, wkvb_ptr, wkvb_s_ptr, inv_freq_ptr, pos_ptr, cache_ptr, qabs_ptr,
    eps, mscale, stride_wn, stride_sn, stride_cs,
    H: tl.constexpr, R: tl.constexpr, DN: tl.constexpr, DR: tl.constexpr, DV: tl.constexpr,
    DT: tl.constexpr, WDT: tl.constexpr, NF4: tl.constexpr, DN_PAD: tl.constexpr, DR_PAD: tl.constexpr,
    R_BLOCK: tl.constexpr,
):  # fmt: skip
    rb = tl.program_id(0)
    h = tl.program_id(1)
    pos = tl.load(pos_ptr)
    q_row = q_ptr + h * (DN + DR)
    qabs_row = qabs_ptr + h * (R + DR)
    # q_lat[h, 64 rb ...] = q_nope[h] @ W_uk[h][:, 64 rb ...]: a reduction over the Dn rows
    d = tl.arange(0, DN_PAD)
    rows = (h * (DN + DV) + d).to(tl.int64)
    q_nope = tl.load(q_row + d, mask=d < DN, other=0.0).to(tl.float32)[:, None, None, None]
    blocks = rb + tl.arange(0, 1)
    levels = nf4_levels() if NF4 else 0.0
    w_even, w_odd, scale = weight_tile(
        wkvb_ptr, wkvb_s_ptr, levels, rows, blocks, (d < DN)[:, None], stride_wn, stride_sn, NF4, WDT
    )
    lat_even = tl.sum(w_even * scale * q_nope, axis=0)  # [1, 8, 4]
    lat_odd = tl.sum(w_odd * scale * q_nope, axis=0)
    out = qabs_row + pair_index(blocks) * 2
    tl.store(out, lat_even.to(DT))
    tl.store(out + 1, lat_odd.to(DT))
    j = tl.arange(0, DR_PAD // 2)
    if rb == 0:  # the head's rotated q_pe
        first, second = _rope(q_row + DN, pos, inv_freq_ptr, mscale, DR, DR_PAD)
        tl.store(qabs_row + R + j, first.to(DT), mask=j < DR // 2)
        tl.store(qabs_row + R + DR // 2 + j, second.to(DT), mask=j < DR // 2)
    if (rb == 0) & (h == 0):  # the token's cache row: [rmsnorm(latent) | rope(k_pe)]
        row = cache_ptr + pos * stride_cs
        r = tl.arange(0, R_BLOCK)
        latent = tl.load(kv_ptr + r, mask=r < R, other=0.0).to(tl.float32)
        rstd = 1.0 / tl.sqrt(tl.sum(latent * latent, axis=0) / R + eps)
        weight = tl.load(kv_norm_ptr + r, mask=r < R, other=0.0).to(tl.float32)
        tl.store(row + r, (weight * (latent * rstd).to(DT).to(tl.float32)).to(DT), mask=r < R)
        first, second = _rope(kv_ptr + R, pos, inv_freq_ptr, mscale, DR, DR_PAD)
        tl.store(row + R + j, first.to(DT), mask=j < DR // 2)
        tl.store(row + R + DR // 2 + j, second.to(DT), mask=j < DR // 2)


@triton.jit
def _dot(a, b, FP32: tl.constexpr, IEEE: tl.constexpr):
    """a @ b with fp32 accumulation: fp32 inputs under the interpreter, IEEE fp32 for fp32 caches."""
    if FP32:
        return tl.dot(a.to(tl.float32), b.to(tl.float32))
    elif IEEE:
        return tl.dot(a, b, input_precision="ieee")
    else:
        return tl.dot(a, b)


@triton.jit
def _mla_attend_kernel(
    qabs_ptr, cache_ptr, pos_ptr, acc_ptr, m_ptr, l_ptr, scale, stride_cs,
    H: tl.constexpr, R: tl.constexpr, DR: tl.constexpr, BH: tl.constexpr, DR_PAD: tl.constexpr,
    S_MAX: tl.constexpr, MIN_KEYS: tl.constexpr, BL: tl.constexpr, FP32: tl.constexpr, IEEE: tl.constexpr,
):  # fmt: skip
    split = tl.program_id(0)
    length, n_split, chunk = _split_plan(pos_ptr, S_MAX, MIN_KEYS, BL)
    if split < n_split:
        heads = tl.arange(0, BH)
        h_ok = heads < H
        r = tl.arange(0, R)
        e = tl.arange(0, DR_PAD)
        q_lat = tl.load(qabs_ptr + heads[:, None] * (R + DR) + r[None, :], mask=h_ok[:, None], other=0.0)
        q_pe = tl.load(
            qabs_ptr + heads[:, None] * (R + DR) + R + e[None, :], mask=h_ok[:, None] & (e < DR)[None, :], other=0.0
        )
        start = split * chunk
        end = tl.minimum(start + chunk, length)
        m_i = tl.full([BH], float("-inf"), tl.float32)
        l_i = tl.zeros([BH], tl.float32)
        acc = tl.zeros([BH, R], tl.float32)
        for k0 in range(start, end, BL):
            keys = k0 + tl.arange(0, BL)
            k_ok = keys < end
            rows = cache_ptr + keys.to(tl.int64)[:, None] * stride_cs
            k_lat = tl.load(rows + r[None, :], mask=k_ok[:, None], other=0.0)  # [BL, R]: keys and values
            k_pe = tl.load(rows + R + e[None, :], mask=k_ok[:, None] & (e < DR)[None, :], other=0.0)
            s = (_dot(q_lat, tl.trans(k_lat), FP32, IEEE) + _dot(q_pe, tl.trans(k_pe), FP32, IEEE)) * scale
            s = tl.where(k_ok[None, :], s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, axis=1))
            p = tl.exp(s - m_new[:, None])
            alpha = tl.exp(m_i - m_new)
            l_i = l_i * alpha + tl.sum(p, axis=1)
            acc = acc * alpha[:, None] + _dot(p.to(k_lat.dtype), k_lat, FP32, IEEE)
            m_i = m_new
        out = split * H + heads
        tl.store(acc_ptr + out[:, None] * R + r[None, :], acc, mask=h_ok[:, None])
        tl.store(m_ptr + out, m_i, mask=h_ok)
        tl.store(l_ptr + out, l_i, mask=h_ok)


@triton.jit
def _mla_out_kernel(
    acc_ptr, m_ptr, l_ptr, pos_ptr, wkvb_ptr, wkvb_s_ptr, out_ptr, stride_wn, stride_sn,
    H: tl.constexpr, R: tl.constexpr, DN: tl.constexpr, DV: tl.constexpr,
    DT: tl.constexpr, WDT: tl.constexpr, NF4: tl.constexpr,
    S_MAX: tl.constexpr, MIN_KEYS: tl.constexpr, BL: tl.constexpr, BN: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    h = tl.program_id(1)
    _, n_split, _ = _split_plan(pos_ptr, S_MAX, MIN_KEYS, BL)
    splits = tl.arange(0, S_MAX)
    m = tl.load(m_ptr + splits * H + h, mask=splits < n_split, other=float("-inf"))
    top = tl.max(m, axis=0)
    factor = tl.where(splits < n_split, tl.exp(m - top), 0.0)
    total = tl.sum(factor * tl.load(l_ptr + splits * H + h, mask=splits < n_split, other=0.0), axis=0)
    blocks = tl.arange(0, R // 64)
    ps = pair_index(blocks)  # [R/64, 8, 4]
    o_even = tl.zeros([R // 64, 8, 4], tl.float32)
    o_odd = tl.zeros([R // 64, 8, 4], tl.float32)
    for s in range(0, n_split):
        f = tl.sum(tl.where(splits == s, factor, 0.0), axis=0)
        part = acc_ptr + (s * H + h) * R + ps * 2
        o_even += f * tl.load(part)
        o_odd += f * tl.load(part + 1)
    o_even = (o_even / total).to(DT).to(tl.float32)[None]  # the attention output in latent space
    o_odd = (o_odd / total).to(DT).to(tl.float32)[None]
    v = pid * BN + tl.arange(0, BN)
    v_ok = v < DV
    rows = (h * (DN + DV) + DN + v).to(tl.int64)
    levels = nf4_levels() if NF4 else 0.0
    mask = v_ok[:, None] & (blocks < R // 64)[None, :]
    w_even, w_odd, scale = weight_tile(wkvb_ptr, wkvb_s_ptr, levels, rows, blocks, mask, stride_wn, stride_sn, NF4, WDT)
    y = row_sums((w_even * o_even + w_odd * o_odd) * scale, BN)
    tl.store(out_ptr + h * DV + v, y.to(DT), mask=v_ok)


def _check(shape: MLAShape) -> None:
    if shape.rank % BLOCKSIZE or shape.rank & (shape.rank - 1):
        raise ValueError(f"the MLA decode kernels need kv_lora_rank a power of two >= 64, got {shape.rank}")
    if shape.rope % 2:
        raise ValueError(f"the rope head dim must be even, got {shape.rope}")


def mla_prep(
    q: torch.Tensor, kv: torch.Tensor, position: torch.Tensor, cache: torch.Tensor, layer: MLALayer
) -> torch.Tensor:
    """q [H*(Dn+Dr)], kv [R+Dr] of one token, its position [1] -> q_abs [H, R+Dr]; writes cache[position]."""
    shape, kv_b, kv_norm = layer.shape, layer.kv_b, layer.kv_norm
    _check(shape)
    h, rank, dr = shape.heads, shape.rank, shape.rope
    q_abs = torch.empty(h, rank + dr, dtype=q.dtype, device=q.device)
    nf4 = is_nf4(kv_b)
    _mla_prep_kernel[(rank // BLOCKSIZE, h)](
        q, kv, kv_norm[0], codes(kv_b), scales(kv_b), layer.inv_freq, position, cache,
        q_abs, kv_norm[1], layer.mscale, *strides(kv_b), cache.stride(0),
        H=h, R=rank, DN=shape.nope, DR=dr, DV=shape.v, DT=tl_dtype(q.dtype),
        WDT=tl.uint8 if nf4 else tl_dtype(kv_b.dtype), NF4=nf4, DN_PAD=triton.next_power_of_2(shape.nope),
        DR_PAD=max(2, triton.next_power_of_2(dr)), R_BLOCK=triton.next_power_of_2(rank), num_warps=4,
    )  # fmt: skip
    return q_abs


def mla_attend(
    q_abs: torch.Tensor, cache: torch.Tensor, position: torch.Tensor, shape: MLAShape
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Split-K attention of every head over cache[: position + 1] -> per-split (acc [S, H, R], max, sum [S, H])."""
    h, rank = shape.heads, shape.rank
    acc = torch.empty(MAX_SPLITS, h, rank, dtype=torch.float32, device=q_abs.device)
    m = torch.empty(MAX_SPLITS, h, dtype=torch.float32, device=q_abs.device)
    l = torch.empty_like(m)  # noqa: E741 (the softmax denominator's usual name)
    _mla_attend_kernel[(MAX_SPLITS,)](
        q_abs, cache, position, acc, m, l, shape.scale, cache.stride(0),
        H=h, R=rank, DR=shape.rope, BH=max(16, triton.next_power_of_2(h)),
        DR_PAD=max(16, triton.next_power_of_2(shape.rope)), S_MAX=MAX_SPLITS, MIN_KEYS=MIN_SPLIT_KEYS,
        BL=BLOCK_KEYS, FP32=_INTERPRET, IEEE=cache.dtype == torch.float32, num_warps=4, num_stages=2,
    )  # fmt: skip
    return acc, m, l


def mla_out(
    parts: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    position: torch.Tensor,
    kv_b: Weight,
    shape: MLAShape,
    dtype: torch.dtype,
    block_rows: int = 16,
) -> torch.Tensor:
    """Combine the splits and apply W_uv -> the attention output [H * Dv] in `dtype` (o_proj's input)."""
    h = shape.heads
    out = torch.empty(h * shape.v, dtype=dtype, device=position.device)
    nf4 = is_nf4(kv_b)
    acc, m, l = parts  # noqa: E741
    _mla_out_kernel[(triton.cdiv(shape.v, block_rows), h)](
        acc, m, l, position, codes(kv_b), scales(kv_b), out, *strides(kv_b),
        H=h, R=shape.rank, DN=shape.nope, DV=shape.v, DT=tl_dtype(dtype),
        WDT=tl.uint8 if nf4 else tl_dtype(kv_b.dtype), NF4=nf4,
        S_MAX=MAX_SPLITS, MIN_KEYS=MIN_SPLIT_KEYS, BL=BLOCK_KEYS, BN=block_rows, num_warps=4,
    )  # fmt: skip
    return out


def mla_decode(
    q: torch.Tensor, kv: torch.Tensor, position: torch.Tensor, cache: torch.Tensor, layer: MLALayer
) -> torch.Tensor:
    """One token's absorbed attention in three launches: writes its cache row, returns [H * Dv]."""
    q_abs = mla_prep(q, kv, position, cache, layer)
    return mla_out(mla_attend(q_abs, cache, position, layer.shape), position, layer.kv_b, layer.shape, q.dtype)


# --- PyTorch reference --------------------------------------------------------------------------


def _rope_reference(x: torch.Tensor, pos: int, inv_freq: torch.Tensor, mscale: float) -> torch.Tensor:
    angle = float(pos) * inv_freq
    cos, sin = angle.cos() * mscale, angle.sin() * mscale
    a, b = x.float()[..., 0::2], x.float()[..., 1::2]
    return torch.cat((a * cos - b * sin, b * cos + a * sin), dim=-1).to(x.dtype)


def mla_decode_reference(
    q: torch.Tensor, kv: torch.Tensor, position: int, cache: torch.Tensor, layer: MLALayer
) -> torch.Tensor:
    """What `mla_decode` computes (and writes into `cache`), the way `MLAttention._absorbed` does."""
    shape, inv_freq, mscale = layer.shape, layer.inv_freq, layer.mscale
    h, rank, dn, dv = shape.heads, shape.rank, shape.nope, shape.v
    dtype = q.dtype
    heads = q.view(h, dn + shape.rope)
    w = dense(layer.kv_b).view(h, dn + dv, rank).to(dtype)
    cache[position, :rank] = rms_norm_reference(kv[:rank], layer.kv_norm)
    cache[position, rank:] = _rope_reference(kv[rank:], position, inv_freq, mscale)
    q_lat = torch.einsum("hd,hdr->hr", heads[:, :dn].float(), w[:, :dn].float()).to(dtype)
    q_full = torch.cat((q_lat, _rope_reference(heads[:, dn:], position, inv_freq, mscale)), dim=-1)
    keys = cache[: position + 1]
    p = torch.softmax((q_full.float() @ keys.float().t()) * shape.scale, dim=-1)
    o = (p @ keys[:, :rank].float()).to(dtype)  # [H, R]
    return torch.einsum("hr,hvr->hv", o.float(), w[:, dn:].float()).to(dtype).flatten()
