"""Absorbed MLA decode (Triton; interpreter on CPU) against its reference: one split and many,
positions that are not a multiple of the key block, NF4 and dense kv_b, the cache row it writes."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from kimivl_cli.kernels import mla_decode
from kimivl_cli.kernels.mla_decode import MLALayer, MLAShape, mla_decode_reference
from kimivl_cli.weight_formats import quantize_nf4


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max() / b.float().abs().max())


def _case(h: int, r: int, dn: int, dr: int, dv: int, slots: int, dtype: torch.dtype, nf4: bool, seed: int = 0,
          mscale: float = 1.0):  # fmt: skip
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(h * (dn + dv), r, generator=gen) * 0.2
    kv_b = (lambda q: (q.packed, q.absmax))(quantize_nf4(w)) if nf4 else w.to(dtype)
    shape = MLAShape(h, r, dn, dr, dv, (dn + dr) ** -0.5)
    q = torch.randn(h * (dn + dr), generator=gen).to(dtype)
    kv = torch.randn(r + dr, generator=gen).to(dtype)
    norm = ((1 + 0.1 * torch.randn(r, generator=gen)).to(dtype), 1e-6)
    inv_freq = 1.0 / 10000 ** (torch.arange(0, dr, 2).float() / dr)
    cache = (torch.randn(slots, r + dr, generator=gen) * 0.5).to(dtype)
    return q, kv, cache, MLALayer(norm, kv_b, inv_freq, mscale, shape)


# (heads, rank, nope, rope, v, position, slots, keys per split): the interpreter's key block is 32
CASES = [
    (4, 64, 16, 8, 16, 5, 16, 128),  # one split, 6 keys: a partial block
    (2, 64, 32, 16, 32, 300, 400, 64),  # 5 splits of 64 keys, the last partial; slots past it unread
    (16, 128, 16, 8, 16, 70, 100, 16),  # Kimi-VL's 16 heads, 5 splits of 32 keys (blocks round up)
]


@pytest.mark.parametrize("nf4", [True, False])
@pytest.mark.parametrize(("h", "r", "dn", "dr", "dv", "pos", "slots", "keys"), CASES)
def test_mla_decode_matches_reference(monkeypatch, nf4, h, r, dn, dr, dv, pos, slots, keys) -> None:
    monkeypatch.setattr(mla_decode, "MIN_SPLIT_KEYS", keys)
    q, kv, cache, layer = _case(h, r, dn, dr, dv, slots, torch.float32, nf4, seed=pos)
    cache[pos + 1 :] = float("nan")  # slots past the position must not be read
    expected_cache = cache.clone()
    expected = mla_decode_reference(q, kv, pos, expected_cache, layer)
    got = mla_decode.mla_decode(q, kv, torch.tensor([pos]), cache, layer)
    assert _rel(got, expected) < 1e-5
    torch.testing.assert_close(cache, expected_cache, rtol=1e-6, atol=1e-6, equal_nan=True)  # row `pos` only


def test_bf16_cache_and_yarn_mscale() -> None:
    """bf16 (bound of a few ulps: the interpreter rounds fp32 -> bf16 toward zero) with mscale != 1."""
    q, kv, cache, layer = _case(4, 64, 16, 8, 16, 40, torch.bfloat16, True, mscale=1.2)
    expected_cache = cache.clone()
    expected = mla_decode_reference(q, kv, 33, expected_cache, layer)
    got = mla_decode.mla_decode(q, kv, torch.tensor([33]), cache, layer)
    assert got.dtype == torch.bfloat16
    assert _rel(got, expected) < 5e-2
    assert _rel(cache, expected_cache) < 2e-2


def test_rank_must_be_a_power_of_two() -> None:
    q, kv, cache, layer = _case(2, 64, 16, 8, 16, 8, torch.float32, True)
    odd = dataclasses.replace(layer, shape=MLAShape(2, 96, 16, 8, 16, 1.0))
    with pytest.raises(ValueError, match="power of two"):
        mla_decode.mla_prep(q, kv, torch.tensor([0]), cache, odd)
