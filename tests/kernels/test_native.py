"""The native NF4 GEMV (compiled on first use) against dequantise-then-matmul, and the CPU MoE
path that uses it for decode-sized expert batches."""

from __future__ import annotations

import pytest
import torch

from kimivl_cli.kernels import native
from kimivl_cli.kernels.moe_cpu import moe_cpu
from kimivl_cli.kernels.reference import fused_moe_reference
from kimivl_cli.quant.nf4 import NF4Tensor, dequantize_nf4, quantize_nf4

pytestmark = pytest.mark.skipif(not native.available(), reason="no C compiler: the torch path serves instead")


@pytest.mark.parametrize(("rows", "n", "k"), [(1, 1408, 2048), (3, 100, 64), (2, 7, 1408)])
def test_gemv_equals_dequantised_matmul(rows: int, n: int, k: int) -> None:
    gen = torch.Generator().manual_seed(n)
    q = quantize_nf4(torch.randn(n, k, generator=gen) * 0.02)
    x = torch.randn(rows, k, generator=gen).to(torch.bfloat16)
    ref = x.float() @ dequantize_nf4(NF4Tensor(q.packed, q.absmax, torch.float32)).t()
    got = native.nf4_gemv(x, q.packed, q.absmax)
    assert got.dtype == torch.float32 and got.shape == (rows, n)
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-5)  # fp32, another summation order


def test_moe_cpu_decode_equals_reference() -> None:
    """One token, top-6 of 8 experts: every active expert takes the native path."""
    gen = torch.Generator().manual_seed(1)
    e, h, i = 8, 128, 192
    q = [quantize_nf4(torch.randn(*shape, generator=gen) * 0.05) for shape in ((e, i, h), (e, i, h), (e, h, i))]
    dense = [dequantize_nf4(NF4Tensor(t.packed, t.absmax, torch.float32)) for t in q]
    x = torch.randn(1, h, generator=gen)
    idx = torch.randperm(e, generator=gen)[:6].view(1, 6)
    w = torch.rand(1, 6, generator=gen)
    got = moe_cpu(x, idx, w, *[(t.packed, t.absmax) for t in q])
    torch.testing.assert_close(got, fused_moe_reference(x, idx, w, *dense), rtol=1e-4, atol=1e-5)
