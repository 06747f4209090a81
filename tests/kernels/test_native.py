"""The native NF4 kernels (compiled on first use).

- exact GEMV against dequantise-then-matmul;
- int8-activation GEMV and MoE decode step against a torch model of their integer math (tight:
  proves the kernels compute what they claim) and against the exact result (the accuracy bound);
- the portable scalar build against the AVX2 one; every thread count gives the same rows;
- the CPU MoE and linear paths route one token to the int8 kernels, more to the exact ones.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from kimivl_cli.kernels import native
from kimivl_cli.kernels.moe_cpu import moe_cpu, nf4_linear_cpu
from kimivl_cli.kernels.reference import fused_moe_reference
from kimivl_cli.quant.nf4 import BLOCKSIZE, NF4Tensor, dequantize_nf4, nf4_code, quantize_nf4

pytestmark = pytest.mark.skipif(not native.available(), reason="no C compiler: the torch path serves instead")


def _rel(got: torch.Tensor, ref: torch.Tensor) -> float:
    return float((got - ref).norm() / ref.norm())


def _nf4(*shape: int, seed: int = 0, std: float = 0.02) -> NF4Tensor:
    return quantize_nf4(torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * std)


def _dense(q: NF4Tensor) -> torch.Tensor:
    return dequantize_nf4(NF4Tensor(q.packed, q.absmax, torch.float32))


# ---------------------------------------------------------------- a torch model of the int8 math


def _q8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [K] -> integer values [K/64, 64] (round half to even, as lrintf) and block scales [K/64]."""
    blocks = x.float().view(-1, BLOCKSIZE)
    amax = blocks.abs().amax(1)
    inv = torch.where(amax > 0, 127 / amax, torch.zeros_like(amax))
    return (blocks * inv[:, None]).round(), amax / 127


def _q8_gemv_model(x: torch.Tensor, q: NF4Tensor) -> torch.Tensor:
    """x [K] -> [N]: integer block dots of round(127·level) and the int8 x, scaled by absmax·s/127."""
    n, k = q.packed.shape[0], q.packed.shape[1] * 2
    codes = torch.stack([q.packed >> 4, q.packed & 15], -1).view(n, k).long()
    levels = (nf4_code() * 127).round()[codes].view(n, k // BLOCKSIZE, BLOCKSIZE)
    xq, s = _q8(x)
    block_sums = (levels * xq).sum(-1)  # exact in fp32: |sum| <= 64 * 127 * 127 < 2**24
    return (block_sums * q.absmax * s).sum(-1) / 127


def _moe_decode_model(x, experts, route_w, gate, up, down) -> torch.Tensor:
    out = torch.zeros(x.shape[0])
    for e, w in zip(experts.tolist(), route_w.tolist(), strict=True):
        g, u = (_q8_gemv_model(x, NF4Tensor(t.packed[e], t.absmax[e], torch.float32)) for t in (gate, up))
        out += w * _q8_gemv_model(F.silu(g) * u, NF4Tensor(down.packed[e], down.absmax[e], torch.float32))
    return out


# ---------------------------------------------------------------- GEMV


@pytest.mark.parametrize(("rows", "n", "k"), [(1, 1408, 2048), (3, 100, 64), (2, 7, 1408)])
def test_exact_gemv_equals_dequantised_matmul(rows: int, n: int, k: int) -> None:
    q = _nf4(n, k, seed=n)
    x = torch.randn(rows, k, generator=torch.Generator().manual_seed(k)).to(torch.bfloat16)
    got = native.nf4_gemv(x, q.packed, q.absmax)
    assert got.dtype == torch.float32 and got.shape == (rows, n)
    torch.testing.assert_close(got, x.float() @ _dense(q).t(), rtol=1e-4, atol=1e-5)  # another summation order


@pytest.mark.parametrize(("n", "k"), [(1408, 2048), (7, 64), (5, 1408), (1001, 128)])
def test_int8_gemv_computes_its_integer_model(n: int, k: int) -> None:
    """Row counts off the 4-row unroll and the thread split; a zero block (scale 0)."""
    q = _nf4(n, k, seed=k)
    x = torch.randn(k, generator=torch.Generator().manual_seed(n))
    x[:BLOCKSIZE] = 0
    got = native.nf4_gemv(x[None], q.packed, q.absmax, int8=True)[0]
    torch.testing.assert_close(got, _q8_gemv_model(x, q), rtol=1e-5, atol=1e-6)


def test_int8_gemv_error_against_exact() -> None:
    """Int8 rounding of levels and activations costs < 1% of the output norm (measured 0.84%),
    against ~10% for NF4 itself."""
    q = _nf4(1408, 2048)
    x = torch.randn(1, 2048, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
    exact = x.float() @ _dense(q).t()
    assert _rel(native.nf4_gemv(x, q.packed, q.absmax, int8=True), exact) < 1e-2


def test_int8_gemv_takes_one_row() -> None:
    q = _nf4(8, 64)
    with pytest.raises(ValueError, match="one row"):
        native.nf4_gemv(torch.randn(2, 64), q.packed, q.absmax, int8=True)


# ---------------------------------------------------------------- MoE decode step


def _experts(e: int, h: int, i: int) -> tuple[NF4Tensor, NF4Tensor, NF4Tensor]:
    return _nf4(e, i, h, seed=1, std=0.05), _nf4(e, i, h, seed=2, std=0.05), _nf4(e, h, i, seed=3, std=0.05)


@pytest.mark.parametrize("active", [1, 3, 6])
def test_moe_decode_computes_its_integer_model(active: int) -> None:
    """Odd expert counts exercise the unpaired expert in the down phase."""
    gate, up, down = _experts(8, 256, 192)
    gen = torch.Generator().manual_seed(active)
    x, ids, w = torch.randn(256, generator=gen), torch.randperm(8, generator=gen)[:active], torch.rand(active)
    got = native.nf4_moe_decode(x, ids, w, *[(t.packed, t.absmax) for t in (gate, up, down)])
    assert _rel(got, _moe_decode_model(x, ids, w, gate, up, down)) < 1e-5


def test_moe_decode_error_against_exact() -> None:
    """Three int8 products and two activation roundings: ~2% of the output norm (measured 1.7% at
    real size), against ~15% for NF4 itself (benchmarks/moe.py)."""
    gate, up, down = _experts(6, 1024, 704)
    x = torch.randn(1, 1024, generator=torch.Generator().manual_seed(0))
    idx, w = torch.tensor([[4, 0, 5, 2, 1, 3]]), torch.rand(1, 6, generator=torch.Generator().manual_seed(1))
    exact = fused_moe_reference(x, idx, w, *[_dense(t) for t in (gate, up, down)])
    assert _rel(moe_cpu(x, idx, w, *[(t.packed, t.absmax) for t in (gate, up, down)]), exact) < 2.5e-2


# ---------------------------------------------------------------- builds, threads, routing


def test_scalar_build_equals_simd_build() -> None:
    """The portable loops (no AVX2 flags) compute the same integer sums as the AVX2 ones."""
    scalar = native.build(simd=False)
    assert scalar is not None
    q = _nf4(300, 192)
    x = torch.randn(2, 192)
    for int8 in (False, True):
        rows = x[:1] if int8 else x
        a = native.nf4_gemv(rows, q.packed, q.absmax, int8=int8, lib=scalar)
        torch.testing.assert_close(a, native.nf4_gemv(rows, q.packed, q.absmax, int8=int8), rtol=1e-5, atol=1e-6)
    gate, up, down = _experts(4, 128, 128)
    args = (torch.randn(128), torch.tensor([3, 1, 2]), torch.rand(3), *[(t.packed, t.absmax) for t in (gate, up, down)])
    torch.testing.assert_close(native.nf4_moe_decode(*args, lib=scalar), native.nf4_moe_decode(*args))


def test_thread_counts_agree_and_share_one_openmp_runtime() -> None:
    """Each row is computed whole by one thread: 1 or 2 threads give identical bits. The kernels use
    torch's libgomp (one OpenMP runtime in the process, not two competing thread teams)."""
    q = _nf4(1001, 1024)
    x = torch.randn(1, 1024)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = native.nf4_gemv(x, q.packed, q.absmax, int8=True)
        torch.set_num_threads(2)
        assert torch.equal(native.nf4_gemv(x, q.packed, q.absmax, int8=True), one)
    finally:
        torch.set_num_threads(threads)
    with open("/proc/self/maps") as maps:
        assert len({line.split()[-1] for line in maps if "libgomp" in line}) <= 1


def test_one_token_takes_the_int8_kernels_more_take_the_exact_ones() -> None:
    gate, up, down = _experts(8, 128, 192)
    weights = [(t.packed, t.absmax) for t in (gate, up, down)]
    gen = torch.Generator().manual_seed(0)
    x, idx, w = torch.randn(2, 128, generator=gen), torch.tensor([[5, 1, 7], [0, 1, 2]]), torch.rand(2, 3)
    fused = native.nf4_moe_decode(x[0], idx[0], w[0], *weights)
    assert torch.equal(moe_cpu(x[:1], idx[:1], w[:1], *weights)[0], fused)
    exact = fused_moe_reference(x, idx, w, *[_dense(t) for t in (gate, up, down)])
    torch.testing.assert_close(moe_cpu(x, idx, w, *weights), exact, rtol=1e-4, atol=1e-5)

    q = gate  # a dense layer: [8 * 192, 128] viewed as one matrix
    packed, absmax = q.packed.view(-1, 64), q.absmax.view(-1, 2)
    assert torch.equal(nf4_linear_cpu(x[:1], packed, absmax), native.nf4_gemv(x[:1], packed, absmax, int8=True))
    torch.testing.assert_close(nf4_linear_cpu(x[:1], packed, absmax, exact=True), x[:1] @ _dense(q).view(-1, 128).t())
