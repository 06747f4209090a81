"""Fused NF4 MoE (Triton; interpreter on CPU) and the CPU path vs the per-expert reference."""

from __future__ import annotations

import pytest
import torch

from kimivl_cli.kernels import moe_triton
from kimivl_cli.kernels.moe_cpu import moe_cpu
from kimivl_cli.kernels.moe_triton import fused_moe_nf4, nf4_matmul
from kimivl_cli.kernels.reference import fused_moe_reference
from kimivl_cli.quant.nf4 import dequantize_nf4, quantize_nf4


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max() / b.float().abs().max())


# (tokens, top-k, experts, hidden, inter, experts left without tokens)
CASES = [
    (1, 6, 16, 128, 192, 0),  # decode
    (5, 3, 8, 128, 64, 0),  # ragged: 15 pairs over 8 experts
    (3, 2, 16, 64, 128, 10),  # most experts get no tokens
    (4, 8, 8, 128, 128, 0),  # top-8: every expert used
    (40, 8, 16, 64, 192, 3),  # prefill-size tiles (BM 32), ragged N for BN 64
]


@pytest.mark.parametrize(("t", "k", "e", "h", "i", "skip"), CASES)
def test_fused_moe_matches_reference(make_experts, random_routing, device, t, k, e, h, i, skip) -> None:
    experts = make_experts(e, h, i, seed=t)
    idx, w = random_routing(t, k, e, seed=t, skip=skip)
    x = torch.randn(t, h, generator=torch.Generator().manual_seed(1)).to(device)
    idx, w = idx.to(device), w.to(device)
    ref = fused_moe_reference(x, idx, w, *experts.dense)
    assert _rel(fused_moe_nf4(x, idx, w, *experts.packed), ref) < 1e-3
    if device == "cpu":
        # few rows per expert: the native int8-activation kernels (~2%; their exact math: test_native.py)
        assert _rel(moe_cpu(x, idx, w, *experts.packed), ref) < 3e-2


@pytest.mark.parametrize(("t", "k", "e", "h", "i", "skip"), CASES[1:])
def test_cpu_moe_dequantising_path_is_exact(make_experts, random_routing, cpu_plan, t, k, e, h, i, skip) -> None:
    """Where the plan dequantises (many rows per expert), each expert's products are exact fp32."""
    cpu_plan(nf4_fused_max_rows=0)
    experts = make_experts(e, h, i, seed=t)
    idx, w = random_routing(t, k, e, seed=t, skip=skip)
    x = torch.randn(t, h, generator=torch.Generator().manual_seed(1))
    ref = fused_moe_reference(x, idx, w, *[d.cpu() for d in experts.dense])
    assert _rel(moe_cpu(x, idx, w, *[(p.cpu(), a.cpu()) for p, a in experts.packed]), ref) < 1e-5


def test_prefill_tiles_with_many_rows_per_expert(make_experts, random_routing, device) -> None:
    experts = make_experts(2, 64, 128)
    idx, w = random_routing(70, 2, 2, seed=3)  # 70 rows per expert -> BM 64 / BN 128 tiles
    x = torch.randn(70, 64).to(device)
    ref = fused_moe_reference(x, idx.to(device), w.to(device), *experts.dense)
    assert _rel(fused_moe_nf4(x, idx.to(device), w.to(device), *experts.packed), ref) < 1e-3


@pytest.mark.parametrize(("m", "n", "k"), [(1, 96, 128), (3, 64, 192), (17, 130, 64)])
def test_dense_nf4_matmul(device, m, n, k) -> None:
    gen = torch.Generator().manual_seed(m)
    w = quantize_nf4(torch.randn(n, k, generator=gen).to(device))
    x = torch.randn(m, k, generator=gen).to(device)
    assert _rel(nf4_matmul(x, w.packed, w.absmax), x @ dequantize_nf4(w).t()) < 1e-3


def test_no_host_sync_in_fused_moe(make_experts, random_routing, device, monkeypatch) -> None:
    """.item()/.tolist()/bool() on a tensor would stall a CUDA graph: make them fail loudly."""
    experts = make_experts(8, 64, 64)
    idx, w = random_routing(3, 2, 8)
    x = torch.randn(3, 64).to(device)
    ref = fused_moe_reference(x, idx.to(device), w.to(device), *experts.dense)

    def forbidden(*_args, **_kwargs):
        raise AssertionError("host sync in the MoE path")

    # The interpreter itself reads tensors on the host; the patch guards our Python code.
    monkeypatch.setattr(moe_triton, "_launch", _unpatched_launch(moe_triton._launch))
    for name in ("item", "tolist", "__bool__", "__int__", "__index__"):
        monkeypatch.setattr(torch.Tensor, name, forbidden)
    out = fused_moe_nf4(x, idx.to(device), w.to(device), *experts.packed)
    monkeypatch.undo()
    assert _rel(out, ref) < 1e-3


def _unpatched_launch(launch):
    """Run the Triton launch itself with the host-read methods restored (see the test's note)."""
    saved = {n: getattr(torch.Tensor, n) for n in ("item", "tolist", "__bool__", "__int__", "__index__")}

    def run(*args, **kwargs):
        patched = {n: getattr(torch.Tensor, n) for n in saved}
        for n, f in saved.items():
            setattr(torch.Tensor, n, f)
        try:
            return launch(*args, **kwargs)
        finally:
            for n, f in patched.items():
                setattr(torch.Tensor, n, f)

    return run
