"""Fused MoE and dense NF4 kernels (Triton; the interpreter on CPU) and the CPU path vs the references.

The products are the GPU's: fp32 activations multiply exactly (`input_precision="ieee"`, no TF32),
half-precision ones multiply half-precision weights exactly with fp32 sums; the interpreter, whose
own bf16 `tl.dot` is wrong, multiplies the same rounded operands in fp32 (see moe_triton's doc).
So fp32 cases compare with the fp32 reference, bf16 cases with `_gpu_bf16_reference`, which rounds
where the kernel does, and both hold 1e-3.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from kimivl_cli.kernels.moe_cpu import moe_cpu
from kimivl_cli.kernels.moe_triton import SHARED_BUDGET, fused_moe, launch_config, nf4_matmul, stage_bytes
from kimivl_cli.kernels.reference import fused_moe_reference
from kimivl_cli.weight_formats import NF4Tensor, dequantize_nf4, quantize_nf4


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max() / b.float().abs().max())


def _gpu_bf16_reference(x, idx, w, gate, up, down) -> torch.Tensor:
    """fused_moe on a GPU with bf16 activations: bf16 weights, exact products and fp32 sums, the
    activation rounded to bf16 between the two GEMMs and the output once at the end."""
    xf = x.float()
    out = torch.zeros(x.shape[0], down.shape[1])
    for t, k in torch.cartesian_prod(torch.arange(idx.shape[0]), torch.arange(idx.shape[1])).tolist():
        e = int(idx[t, k])
        h = F.silu(gate[e].float() @ xf[t]) * (up[e].float() @ xf[t])
        out[t] += float(w[t, k]) * (down[e].float() @ h.bfloat16().float())
    return out.bfloat16()


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
    assert _rel(fused_moe(x, idx, w, *experts.packed), ref) < 1e-3  # NF4 weights
    assert _rel(fused_moe(x, idx, w, *experts.dense), ref) < 1e-3  # the same weights in fp32
    if device == "cpu":
        # few rows per expert: the native int8-activation kernels (~2%; their exact math: test_native.py)
        assert _rel(moe_cpu(x, idx, w, *experts.packed), ref) < 3e-2


@pytest.mark.parametrize(("t", "k", "e", "h", "i", "skip"), CASES[1:])
def test_cpu_moe_dequantising_path_is_exact(make_experts, random_routing, cpu_plan, t, k, e, h, i, skip) -> None:
    """Where the plan dequantises (many rows per expert), each expert's products are exact fp32."""
    cpu_plan(nf4_fused_max_rows=0, nf4_tiles_max_rows=0)
    experts = make_experts(e, h, i, seed=t)
    idx, w = random_routing(t, k, e, seed=t, skip=skip)
    x = torch.randn(t, h, generator=torch.Generator().manual_seed(1))
    ref = fused_moe_reference(x, idx, w, *[d.cpu() for d in experts.dense])
    assert _rel(moe_cpu(x, idx, w, *[(p.cpu(), a.cpu()) for p, a in experts.packed]), ref) < 1e-5


@pytest.mark.parametrize(("t", "k", "e", "h", "i", "skip"), CASES[:3])
def test_fused_moe_in_bf16_matches_the_gpu_rounding(make_experts, random_routing, device, t, k, e, h, i, skip) -> None:
    """The bf16 path, NF4 and bf16 weights: the tensor-core products the engine uses on a GPU."""
    experts = make_experts(e, h, i, seed=t)
    idx, w = random_routing(t, k, e, seed=t, skip=skip)
    x = torch.randn(t, h, generator=torch.Generator().manual_seed(1)).bfloat16()
    bf16 = [dequantize_nf4(q, torch.bfloat16) for q in experts.q]  # level * absmax in fp32, rounded once
    ref = _gpu_bf16_reference(x, idx, w, *(t.cpu() for t in bf16))
    x, idx, w = x.to(device), idx.to(device), w.to(device)
    assert _rel(fused_moe(x, idx, w, *experts.packed).cpu(), ref) < 1e-3
    assert _rel(fused_moe(x, idx, w, *bf16).cpu(), ref) < 1e-3


def test_prefill_tiles_with_many_rows_per_expert(make_experts, random_routing, device) -> None:
    experts = make_experts(2, 64, 128)
    idx, w = random_routing(70, 2, 2, seed=3)  # 70 rows per expert -> BM 64 / BN 128 tiles
    x = torch.randn(70, 64).to(device)
    ref = fused_moe_reference(x, idx.to(device), w.to(device), *experts.dense)
    assert _rel(fused_moe(x, idx.to(device), w.to(device), *experts.packed), ref) < 1e-3


@pytest.mark.parametrize(("m", "n", "k"), [(1, 96, 128), (3, 64, 192), (17, 130, 64), (70, 136, 128)])
def test_dense_nf4_matmul(device, m, n, k) -> None:
    gen = torch.Generator().manual_seed(m)
    w = quantize_nf4(torch.randn(n, k, generator=gen).to(device))
    x = torch.randn(m, k, generator=gen).to(device)
    assert _rel(nf4_matmul(x, w.packed, w.absmax), x @ dequantize_nf4(w).t()) < 1e-3


def test_the_kernel_decodes_every_code_exactly(device) -> None:
    """The identity times an NF4 weight is the weight: every one of the 16 levels (looked up in
    registers, no table) times its absmax, exactly as `dequantize_nf4` makes it."""
    codes = torch.arange(256, dtype=torch.uint8).view(4, 64)  # every byte: both nibbles, all 16 codes
    absmax = torch.tensor([[0.5, 2.0], [1.0, 3.0], [0.25, 1.5], [7.0, 0.125]])
    w = NF4Tensor(codes.to(device), absmax.to(device), torch.float32)
    eye = torch.eye(128, device=device)
    assert torch.equal(nf4_matmul(eye, w.packed, w.absmax).t(), dequantize_nf4(w))


@pytest.mark.parametrize("rows", [0.1, 1.5, 48, 96, 1000])
@pytest.mark.parametrize(("a_size", "w_size"), [(2, None), (4, None), (2, 2), (4, 4)])
def test_launch_configs_stay_within_the_shared_memory_budget(rows, a_size, w_size) -> None:
    """The pipeline never stages more than SHARED_BUDGET (99 KB on sm_86/89, less headroom); the
    compiled truth for the engine's launches is in tests/gpu/test_aot.py."""
    for gated in (True, False):
        cfg = launch_config(rows, a_size, w_size, gated)
        assert 2 <= cfg.num_stages <= 4
        assert (cfg.num_stages - 1) * stage_bytes(cfg.block_m, cfg.block_n, a_size, w_size, gated) <= SHARED_BUDGET
