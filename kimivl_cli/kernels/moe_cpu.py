"""NF4 products and the MoE on CPU, each by the path `cpu.plan()` measured fastest on this machine.

Shapes: T tokens, H hidden, I expert intermediate, E experts, K experts per token.
- Up to `plan.nf4_fused_max_rows` rows (always one: batch-1 decode), the native int8 kernels read the
  codes directly (`native.q8_matmul`; the whole routed-expert step, or a whole SwiGLU, is one call:
  `native.nf4_moe`). Int8 activations: ~1% of the output norm off the exact product, against ~10%
  for NF4 itself.
- Then, up to `plan.nf4_tiles_max_rows` rows, a product dequantises 16 weight rows at a time into cache and
  multiplies them in bf16 (`native.nf4_bf16_matmul`: AMX tiles where the CPU has them).
- Many rows per expert, where the plan measured it faster: the routed-expert step is one native call that
  dequantises 16 weight rows at a time into cache and multiplies them in bf16 (`native.nf4_bf16_moe`:
  AMX tiles where the CPU has them).
- More rows otherwise: the matrix is dequantised once (natively, to the GEMM's dtype) and one GEMM serves all
  rows (bf16 through oneDNN where the plan says it wins, AMX on CPUs that have it; else fp32).
  The MoE then loops over the active experts on the host, each expert by its own row count.

Plain rows: `linear` (one bf16 row: the native GEMV; more rows of half precision: a bf16 GEMM or an
upcast to fp32, as the plan measured). Routed experts with bf16 stacks (`grouped_experts`): one native
call (`native.bf16_moe`: AMX tiles read the weights in place, or bf16 dot products) up to `plan.bf16_moe_max_rows` rows per expert, else torch's
GEMM per active expert (`grouped_experts_reference`).

This is the CPU path only (GPUs use the sync-free Triton kernels in `moe_triton.py`).
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
import torch.nn.functional as F

from kimivl_cli.kernels import cpu, native
from kimivl_cli.kernels.moe import ExpertWeights
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


_HALF = (torch.bfloat16, torch.float16)


def linear(x: torch.Tensor, weight: torch.Tensor, out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """x [..., K] @ weightᵀ -> [..., N] in `out_dtype` (default x's), on CPU tensors. One row of bf16
    runs the native GEMV (fp32 sums, one rounding: batch-1 decode); more rows of half precision run as
    the CPU plan measured fastest on this machine (a bf16 GEMM, or an upcast to fp32)."""
    out_dtype = out_dtype or x.dtype
    if x.dtype in _HALF:
        rows = x.numel() // x.shape[-1]
        if rows == 1 and weight.dtype == torch.bfloat16 and native.available():
            return native.bf16_matvec(x.reshape(-1), weight).to(out_dtype).view(*x.shape[:-1], -1)
        if cpu.plan().upcasts(rows):
            return F.linear(x.float(), weight.float()).to(out_dtype)
    return F.linear(x, weight).to(out_dtype)


def _fused(rows: int) -> bool:
    return native.available() and rows <= cpu.plan().nf4_fused_max_rows


def _gemm_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype a dequantised GEMM of x's rows runs in: x's own, unless the plan upcasts half precision."""
    if x.dtype in (torch.bfloat16, torch.float16) and not cpu.plan().upcasts(x.shape[0]):
        return x.dtype
    return torch.float32


def nf4_linear_cpu(x: torch.Tensor, packed: torch.Tensor, absmax: torch.Tensor) -> torch.Tensor:
    """x [T, Kd] @ NF4 Wᵀ -> [T, N] fp32: the fused int8 kernel for few rows, bf16 tiles dequantised in cache
    for more, else dequantise + one GEMM (as the CPU plan measured fastest)."""
    if _fused(x.shape[0]):
        return native.q8_matmul(x, packed, absmax)
    if native.available() and x.shape[0] <= cpu.plan().nf4_tiles_max_rows:
        return native.nf4_bf16_matmul(x, packed, absmax)
    dtype = _gemm_dtype(x)
    return F.linear(x.to(dtype), dequantize_cpu(packed, absmax, dtype)).float()


def moe_cpu(
    x: torch.Tensor,
    idx: torch.Tensor,
    weights: torch.Tensor,
    gate: ExpertWeights,
    up: ExpertWeights,
    down: ExpertWeights,
) -> torch.Tensor:
    """The CPU `MoEKernel` (`kernels/moe.py`), fp32 out: x [T, H], idx/weights [T, K] -> [T, H] fp32.

    Stacks go to `grouped_experts`. NF4, by the experts' mean row count, as the CPU plan measured: one
    native call dequantising 16 weight rows at a time into bf16 tiles (many rows of bf16 activations), or
    one call of the fused int8 kernel (few rows); else a loop over the experts that received tokens,
    each by its own row count.
    """
    if isinstance(gate, torch.Tensor):
        return grouped_experts(x, idx, weights, gate, up, down)
    n_experts = gate[0].shape[0]
    rows = -(-idx.numel() // n_experts)
    if x.dtype == torch.bfloat16 and native.available() and rows >= cpu.plan().nf4_moe_bf16_min_rows:
        return native.nf4_bf16_moe(x, idx, weights, gate, up, down)
    if _fused(rows):
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
        out.index_put_((token,), y.mul_(route_w[pairs].unsqueeze(1)), accumulate=True)  # not index_add_ (see docs)
    return out


def grouped_experts_reference(
    x: torch.Tensor,
    idx: torch.Tensor,
    weights: torch.Tensor,
    gate: torch.Tensor,
    up: torch.Tensor,
    down: torch.Tensor,
    linear: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = F.linear,
) -> torch.Tensor:
    """x [T, D], idx/weights [T, K], stacks gate/up [E, I, D], down [E, D, I] -> [T, D] fp32 = sum_k
    weights·expert_k(x): the T·K (token, expert) pairs sorted by expert, each active expert run once on its
    tokens by `linear` (a GEMM per expert: only the active experts' weights are touched)."""
    T, K = idx.shape
    flat = idx.flatten()
    order = flat.argsort()
    tokens = order // K  # [T*K] token of each (sorted) pair
    pair_w = weights.flatten()[order]
    counts = torch.bincount(flat, minlength=gate.shape[0]).tolist()
    out = torch.zeros(T, x.shape[-1], dtype=torch.float32, device=x.device)
    start = 0
    for e, n in enumerate(counts):
        if n:
            tok = tokens[start : start + n]
            xe = x[tok]
            y = linear(F.silu(linear(xe, gate[e])) * linear(xe, up[e]), down[e])
            # index_put_ with accumulate, not index_add_ (docs/performance.md)
            out.index_put_((tok,), y.float() * pair_w[start : start + n, None], accumulate=True)
            start += n
    return out


def grouped_experts(
    x: torch.Tensor, idx: torch.Tensor, weights: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor
) -> torch.Tensor:
    """`grouped_experts_reference`'s contract, by the path the CPU plan measured fastest for this many rows
    per expert: one native call for bf16 stacks (fp32 sums), else the reference with `linear`."""
    rows = -(-idx.numel() // gate.shape[0])
    if (
        all(w.dtype == torch.bfloat16 for w in (gate, up, down))
        and native.available()
        and rows <= cpu.plan().bf16_moe_max_rows
    ):
        return native.bf16_moe(x, idx, weights, gate, up, down)
    return grouped_experts_reference(x, idx, weights, gate, up, down, linear)
