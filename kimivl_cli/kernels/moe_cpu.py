"""NF4 products and the MoE on CPU, each by the path `cpu.plan()` measured fastest on this machine.

Shapes: T tokens, H hidden, I expert intermediate, E experts, K experts per token.
- Up to `plan.nf4_fused_max_rows` rows (always one: batch-1 decode), the native int8 kernels read the
  codes directly (`native.q8_matmul`; the whole routed-expert step, or a whole SwiGLU, is one call:
  `native.nf4_moe`). Int8 activations: ~1% of the output norm off the exact product, against ~10%
  for NF4 itself.
- More rows: the matrix is dequantised once (natively, to the GEMM's dtype) and one GEMM serves all
  rows (bf16 through oneDNN where the plan says it wins, AMX on CPUs that have it; else fp32).
  The MoE then loops over the active experts on the host, each expert by its own row count.

This is the CPU path only (GPUs use the sync-free Triton kernels in `moe_triton.py`).
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from kimivl_cli.kernels import cpu, native
from kimivl_cli.weight_formats import BLOCKSIZE, NF4Tensor, dequantize_nf4


@functools.cache
def _bnb_dequantize():
    """bitsandbytes' native CPU dequantiser (a torch op it registers on import), or None. Imported only
    where the native kernels are off: the import alone takes seconds (it pulls in torch._dynamo)."""
    try:
        import bitsandbytes  # noqa: F401

        return torch.ops.bitsandbytes.dequantize_4bit
    except (ImportError, AttributeError, RuntimeError):
        return None


def dequantize_cpu(packed: torch.Tensor, absmax: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """One NF4 matrix (packed [N, Kd/2], absmax [N, Kd/64]) -> [N, Kd] in `dtype` (fp32 math, one rounding)."""
    if native.available() and dtype in (torch.float32, torch.bfloat16):
        return native.nf4_dequantize(packed, absmax, dtype)
    shape = [packed.shape[0], packed.shape[1] * 2]
    if (bnb_dequantize := _bnb_dequantize()) is not None:
        w = bnb_dequantize(packed.reshape(-1, 1), absmax.reshape(-1), BLOCKSIZE, "nf4", shape, torch.float32)
        return w.to(dtype)
    return dequantize_nf4(NF4Tensor(packed, absmax, torch.float32), dtype)


def _fused(rows: int) -> bool:
    return native.available() and rows <= cpu.plan().nf4_fused_max_rows


def _gemm_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype a dequantised GEMM of x's rows runs in: x's own, unless the plan upcasts half precision."""
    if x.dtype in (torch.bfloat16, torch.float16) and not cpu.plan().upcasts(x.shape[0]):
        return x.dtype
    return torch.float32


def nf4_linear_cpu(x: torch.Tensor, packed: torch.Tensor, absmax: torch.Tensor) -> torch.Tensor:
    """x [T, Kd] @ NF4 Wᵀ -> [T, N] fp32: the fused int8 kernel for few rows, else dequantise + one GEMM."""
    if _fused(x.shape[0]):
        return native.q8_matmul(x, packed, absmax)
    dtype = _gemm_dtype(x)
    return F.linear(x.to(dtype), dequantize_cpu(packed, absmax, dtype)).float()


def moe_cpu(
    x: torch.Tensor,
    idx: torch.Tensor,
    weights: torch.Tensor,
    gate: tuple[torch.Tensor, torch.Tensor],
    up: tuple[torch.Tensor, torch.Tensor],
    down: tuple[torch.Tensor, torch.Tensor],
) -> torch.Tensor:
    """Same contract as `moe_triton.fused_moe` but fp32 out: x [T, H], idx/weights [T, K] -> [T, H] fp32.

    One native call when the experts' mean row count is within the fused kernel's range; else a loop
    over the experts that received tokens, each by its own row count.
    """
    n_experts = gate[0].shape[0]
    if _fused(-(-idx.numel() // n_experts)):
        return native.nf4_moe(x, idx, weights, gate, up, down)
    k = idx.shape[1]
    flat = idx.reshape(-1)
    order = torch.argsort(flat, stable=True)  # pairs grouped by expert
    counts = torch.bincount(flat, minlength=n_experts).tolist()
    route_w = weights.reshape(-1).float()
    out = torch.zeros(x.shape[0], x.shape[1], dtype=torch.float32)
    start = 0
    for e, n in enumerate(counts):
        if n == 0:
            continue
        pairs = order[start : start + n]
        start += n
        token = pairs // k
        xe = x[token]  # [n, H]
        h = F.silu(nf4_linear_cpu(xe, gate[0][e], gate[1][e])).mul_(nf4_linear_cpu(xe, up[0][e], up[1][e]))
        y = nf4_linear_cpu(h.to(x.dtype), down[0][e], down[1][e])  # [n, H]
        out.index_put_((token,), y.mul_(route_w[pairs].unsqueeze(1)), accumulate=True)  # index_add_: 10+ ms here
    return out
