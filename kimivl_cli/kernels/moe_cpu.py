"""MoE on CPU with NF4 experts: only the experts that received tokens, straight from the codes.

Shapes: T tokens, H hidden, I expert intermediate, E experts, K experts per token.
- One token (batch-1 decode): one native call for the whole step (`native.nf4_moe_decode`,
  int8 activations, ~1.7% of the output norm off the exact result against NF4's own ~15%);
  at real size ~1 ms on 2 AVX2 cores, memory-bound (see benchmarks/moe.py).
- More tokens, exact fp32 per active expert: an expert with a few rows runs the native exact
  GEMV; one with more is decoded to fp32 once per call and used for all of its rows. Measured on
  AVX2 (no AVX-512/AMX): fp32 GEMMs are ~5x faster than bf16 ones for tens of rows, and
  bitsandbytes' NF4 dequantiser beats torch ops ~4x. Work O(active experts * I * H) decode +
  O(T * K * I * H) GEMM; extra memory: one expert's three fp32 matrices (~35 MB).

This path loops over active experts on the host: it is the CPU path only (GPUs use the
sync-free Triton kernels in `moe_triton.py`).
"""

from __future__ import annotations

import torch

from kimivl_cli.kernels import native
from kimivl_cli.quant.nf4 import BLOCKSIZE, NF4Tensor, dequantize_nf4

# Rows up to which reading the codes once per row (native GEMV, ~0.7 ms per 1408x2048 matrix
# on one AVX2 core) beats decoding the matrix once to fp32 (~6 ms) and one GEMM.
GEMV_MAX_ROWS = 4

try:  # bitsandbytes registers its native CPU dequantiser as a torch op on import
    import bitsandbytes  # noqa: F401

    _BNB_DEQUANT = torch.ops.bitsandbytes.dequantize_4bit
except (ImportError, AttributeError, RuntimeError):
    _BNB_DEQUANT = None


def dequantize_fp32(packed: torch.Tensor, absmax: torch.Tensor) -> torch.Tensor:
    """One NF4 matrix (packed [N, Kd/2], absmax [N, Kd/64]) -> fp32 [N, Kd], natively if possible."""
    shape = [packed.shape[0], packed.shape[1] * 2]
    if _BNB_DEQUANT is not None and packed.device.type == "cpu":
        return _BNB_DEQUANT(packed.reshape(-1, 1), absmax.reshape(-1), BLOCKSIZE, "nf4", shape, torch.float32)
    return dequantize_nf4(NF4Tensor(packed, absmax, torch.float32))


def nf4_linear_cpu(x: torch.Tensor, packed: torch.Tensor, absmax: torch.Tensor, exact: bool = False) -> torch.Tensor:
    """x [T, Kd] @ NF4 Wᵀ -> [T, N] fp32: the native GEMV from the codes for up to GEMV_MAX_ROWS rows
    (one row, i.e. batch-1 decode, with int8 activations unless `exact`), else dequantise once to fp32
    and run one GEMM (the decode cost is shared by all rows)."""
    if x.shape[0] <= GEMV_MAX_ROWS and native.available():
        return native.nf4_gemv(x, packed, absmax, int8=x.shape[0] == 1 and not exact)
    return x.float() @ dequantize_fp32(packed, absmax).t()


def moe_cpu(
    x: torch.Tensor,
    idx: torch.Tensor,
    weights: torch.Tensor,
    gate: tuple[torch.Tensor, torch.Tensor],
    up: tuple[torch.Tensor, torch.Tensor],
    down: tuple[torch.Tensor, torch.Tensor],
) -> torch.Tensor:
    """Same contract as `moe_triton.fused_moe`: x [T, H], idx/weights [T, K] -> [T, H] in x.dtype.

    One token with the native kernels: the fused int8-activation step; else exact fp32 per expert.
    """
    if x.shape[0] == 1 and native.available():
        return native.nf4_moe_decode(x[0], idx[0], weights[0], gate, up, down).to(x.dtype).view(1, -1)
    k = idx.shape[1]
    flat = idx.reshape(-1)
    order = torch.argsort(flat, stable=True)  # pairs grouped by expert
    counts = torch.bincount(flat, minlength=gate[0].shape[0]).tolist()
    xf = x.float()
    route_w = weights.reshape(-1).float()
    out = torch.zeros(x.shape[0], x.shape[1], dtype=torch.float32)
    start = 0
    for e, n in enumerate(counts):
        if n == 0:
            continue
        pairs = order[start : start + n]
        start += n
        token = pairs // k
        xe = xf[token]  # [n, H]
        g = nf4_linear_cpu(xe, gate[0][e], gate[1][e], exact=True)
        u = nf4_linear_cpu(xe, up[0][e], up[1][e], exact=True)
        h = torch.nn.functional.silu(g).mul_(u)  # [n, I]
        y = nf4_linear_cpu(h, down[0][e], down[1][e], exact=True)  # [n, H]
        out.index_put_(
            (token,), y.mul_(route_w[pairs].unsqueeze(1)), accumulate=True
        )  # index_add_: 10+ ms per call here
    return out.to(x.dtype)
