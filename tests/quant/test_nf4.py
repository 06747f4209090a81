"""NF4 / int8 formats: bit-identical to bitsandbytes, round-trip error bounds."""

from __future__ import annotations

import itertools

import pytest
import torch

from kimivl_cli.testing.nf4_twins import dequantize_int8, unpack_nf4_codes
from kimivl_cli.weight_formats import NF4_LEVELS, dequantize_nf4, quantize_int8, quantize_nf4

bnbf = pytest.importorskip("bitsandbytes.functional")


def _bnb_nf4(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    q, state = bnbf.quantize_4bit(w, blocksize=64, quant_type="nf4")
    return q, state


def test_levels_match_bitsandbytes() -> None:
    assert torch.equal(torch.tensor(NF4_LEVELS), bnbf.get_4bit_type("nf4", device="cpu"))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(8, 64), (24, 128), (3, 5, 192)])
def test_packing_is_bit_identical_to_bitsandbytes(dtype: torch.dtype, shape: tuple[int, ...]) -> None:
    torch.manual_seed(sum(shape))
    w = (torch.randn(shape) * 0.05).to(dtype)
    ours = quantize_nf4(w)
    q, state = _bnb_nf4(w)
    assert ours.packed.shape == (*shape[:-1], shape[-1] // 2)
    assert torch.equal(ours.packed.reshape(-1), q.reshape(-1))
    assert torch.equal(ours.absmax.reshape(-1), state.absmax)
    assert torch.equal(dequantize_nf4(ours), bnbf.dequantize_4bit(q, state))


def test_exact_levels_and_ties_round_like_bitsandbytes() -> None:
    # Every level, every midpoint, zeros and a zero block: the edge cases of the rounding rule.
    levels = torch.tensor(NF4_LEVELS)
    mids = (levels[:-1] + levels[1:]) / 2
    row = torch.cat([levels, mids, -mids, torch.zeros(64 - 16 - 30)])
    w = torch.stack([row, torch.zeros(64), row.flip(0) * 3.0])
    ours = quantize_nf4(w)
    q, _state = _bnb_nf4(w)
    assert torch.equal(ours.packed.reshape(-1), q.reshape(-1))
    assert torch.equal(unpack_nf4_codes(ours.packed)[0, :16], torch.arange(16))
    assert torch.equal(dequantize_nf4(ours)[1], torch.zeros(64))


def test_high_nibble_holds_the_first_weight() -> None:
    w = torch.zeros(1, 64)
    w[0, 0], w[0, 1] = -1.0, 1.0  # codes 0 and 15
    assert quantize_nf4(w).packed[0, 0].item() == 0x0F


def test_round_trip_error_is_bounded_by_half_the_widest_gap() -> None:
    torch.manual_seed(0)
    w = torch.randn(64, 256) * 0.02
    t = quantize_nf4(w)
    err = (dequantize_nf4(t) - w).abs().unflatten(-1, (-1, 64))
    gap = max(b - a for a, b in itertools.pairwise(NF4_LEVELS)) / 2
    assert torch.all(err <= gap * t.absmax.unsqueeze(-1) + 1e-7)
    rel = (dequantize_nf4(t) - w).norm() / w.norm()
    assert rel < 0.12  # NF4 on Gaussian weights: ~0.09
    assert t.nbytes * 8 / w.numel() == pytest.approx(4.5)


def test_rejects_k_not_multiple_of_block() -> None:
    with pytest.raises(ValueError, match="multiple of 64"):
        quantize_nf4(torch.randn(4, 96))


def test_chunked_quantization_equals_one_shot(monkeypatch: pytest.MonkeyPatch) -> None:
    import kimivl_cli.weight_formats as nf4

    w = torch.randn(40, 128)
    whole = quantize_nf4(w)
    monkeypatch.setattr(nf4, "_CHUNK_ELEMENTS", 3 * 128)
    chunked = quantize_nf4(w)
    assert torch.equal(whole.packed, chunked.packed) and torch.equal(whole.absmax, chunked.absmax)


def test_int8_round_trip() -> None:
    torch.manual_seed(1)
    w = torch.randn(32, 100, dtype=torch.bfloat16)
    t = quantize_int8(w)
    assert t.q.dtype == torch.int8 and t.scale.shape == (32,)
    err = (dequantize_int8(t, torch.float32) - w.float()).abs()
    assert torch.all(err <= t.scale.unsqueeze(-1) / 2 + 1e-6)
    assert dequantize_int8(t).dtype == torch.bfloat16
