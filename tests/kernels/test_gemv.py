"""Decode GEMVs (Triton; interpreter on CPU) against their PyTorch references.

fp32 runs the kernels' exact arithmetic (products and sums in fp32, like the reference). The
interpreter rounds fp32 -> bf16 toward zero (a GPU rounds to nearest), so bf16 cases get a bound
of a few bf16 ulps instead.
"""

from __future__ import annotations

import pytest
import torch

from kimivl_cli.kernels.gemv import (
    gemv,
    gemv_reference,
    gemv_stacked,
    gemv_swiglu,
    gemv_tiles,
    swiglu_reference,
)
from kimivl_cli.model.config import TextConfig
from kimivl_cli.weight_formats import quantize_nf4


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max() / b.float().abs().max())


def _nf4(n: int, k: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    q = quantize_nf4(torch.randn(n, k, generator=torch.Generator().manual_seed(seed)) * 0.05)
    return q.packed, q.absmax


def _inputs(m: int, n: int, k: int, dtype: torch.dtype, seed: int = 0):
    gen = torch.Generator().manual_seed(seed + 100)
    x = torch.randn(m, k, generator=gen).to(dtype)
    norm = ((1 + 0.1 * torch.randn(k, generator=gen)).to(dtype), 1e-5)
    return x, norm, torch.randn(m, n, generator=gen).to(dtype)


# (rows M, outputs N, inner K, (BN, NB, warps)): ragged N, K not a multiple of the step, BN 1..8
SHAPES = [(1, 37, 192, (8, 4, 1)), (3, 16, 1408, (4, 16, 2)), (2, 64, 128, (1, 2, 1))]


@pytest.mark.parametrize(("m", "n", "k", "tiles"), SHAPES)
def test_nf4_gemv_with_norm_and_residual(m, n, k, tiles) -> None:
    w = _nf4(n, k, seed=n)
    x, norm, res = _inputs(m, n, k, torch.float32)
    assert _rel(gemv(x, w, tiles=tiles), gemv_reference(x, w)) < 1e-5
    got = gemv(x, w, norm=norm, residual=res, tiles=tiles)
    assert _rel(got, gemv_reference(x, w, norm=norm, residual=res)) < 1e-5


@pytest.mark.parametrize(("m", "n", "k", "tiles"), SHAPES[:2])
def test_nf4_stacked_and_swiglu(m, n, k, tiles) -> None:
    first, second, up = _nf4(n, k, seed=1), _nf4(5, k, seed=2), _nf4(n, k, seed=3)
    x, norm, _ = _inputs(m, n, k, torch.float32)
    a, b = gemv_stacked(x, first, second, norm=norm, tiles=tiles)
    assert _rel(a, gemv_reference(x, first, norm=norm)) < 1e-5
    assert _rel(b, gemv_reference(x, second, norm=norm)) < 1e-5
    assert _rel(gemv_swiglu(x, first, up, norm=norm, tiles=tiles), swiglu_reference(x, first, up, norm)) < 1e-5


@pytest.mark.parametrize("wdtype", [torch.float32, torch.bfloat16])
def test_dense_weights_with_fp32_output(wdtype) -> None:
    """lm_head's case: a dense weight, the norm fused, logits rounded to x's dtype and stored in fp32."""
    gen = torch.Generator().manual_seed(5)
    w = torch.randn(40, 256, generator=gen).to(wdtype)
    x, norm, _ = _inputs(1, 40, 256, wdtype)
    got = gemv(x, w, norm=norm, out_dtype=torch.float32, tiles=(8, 4, 1))
    assert got.dtype == torch.float32
    bound = 1e-5 if wdtype == torch.float32 else 3e-2
    assert _rel(got, gemv_reference(x, w, norm=norm, out_dtype=torch.float32)) < bound


def test_bf16_activations() -> None:
    w, up = _nf4(24, 128, seed=7), _nf4(24, 128, seed=8)
    x, norm, res = _inputs(2, 24, 128, torch.bfloat16)
    got = gemv(x, w, norm=norm, residual=res, tiles=(8, 2, 1))
    assert got.dtype == torch.bfloat16
    assert _rel(got, gemv_reference(x, w, norm=norm, residual=res)) < 3e-2
    assert _rel(gemv_swiglu(x, w, up, tiles=(8, 2, 1)), swiglu_reference(x, w, up)) < 3e-2


def test_inner_size_must_match() -> None:
    with pytest.raises(ValueError, match="inner size"):
        gemv(torch.randn(1, 128), _nf4(8, 192, seed=0))


def test_every_kimi_vl_decode_gemv_fills_two_waves_of_132_sms() -> None:
    """The grid, not the chip, sets how fast a GEMV streams its weight: >= 264 programs per launch."""
    cfg = TextConfig()
    heads = cfg.num_attention_heads
    shapes = {
        "q_proj + kv_a_proj": (heads * cfg.qk_head_dim + cfg.kv_lora_rank + cfg.qk_rope_head_dim, cfg.hidden_size),
        "o_proj": (cfg.hidden_size, heads * cfg.v_head_dim),
        "dense gate/up": (cfg.intermediate_size, cfg.hidden_size),
        "dense down": (cfg.hidden_size, cfg.intermediate_size),
        "lm_head": (cfg.vocab_size, cfg.hidden_size),
    }
    for name, (n, k) in shapes.items():
        bn, nb, warps = gemv_tiles(n, k, torch.device("cuda"))
        assert -(-n // bn) >= 264, name
        assert bn * nb == 128 or nb >= k // 64, name  # 32 pairs per thread, or the whole row in one step
        assert warps == max(1, min(4, bn * nb // 32)), name
