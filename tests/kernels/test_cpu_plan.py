"""How the CPU plan turns the fastest NF4 product at each sampled row count into its row bounds."""

from __future__ import annotations

import pytest
import torch

from kimivl_cli.kernels import cpu, native

ANY = 1 << 20
S = len(cpu._NF4_ROW_SAMPLES)  # 4, 8, 16, 32, 64, 128, 256, 512, 1024 rows


@pytest.mark.parametrize(
    ("winners", "bounds"),
    [
        (["int8"] * 2 + ["tiles"] * 3 + ["dequantise"] * (S - 5), (8, 64)),  # an AMX machine's shape
        (["int8"] * 5 + ["dequantise"] * (S - 5), (64, 64)),  # tiles never win: none between
        (["tiles"] * 4 + ["dequantise"] * (S - 4), (1, 32)),  # one row (decode) reads the codes all the same
        (["int8"] * S, (ANY, ANY)),
        (["int8"] * 3 + ["tiles"] * (S - 3), (16, ANY)),
        (["dequantise"] * S, (1, 1)),
        (["int8", "dequantise", "tiles"] + ["dequantise"] * (S - 3), (4, 4)),  # a stray win past a loss: ignored
    ],
)
def test_nf4_row_bounds_follow_the_winners(monkeypatch, winners: list[str], bounds: tuple[int, int]) -> None:
    if not cpu.native_candidates() or native.build(cpu.native_candidates()[0]) is None:
        pytest.skip("no native kernels here")
    monkeypatch.setattr(cpu, "_nf4_row_winners", lambda candidates, dtype, timings: winners)
    why: dict[str, str] = {}
    assert cpu._choose_nf4_rows(cpu.native_candidates()[0], "bf16", {}, why) == bounds
    assert why["nf4_fused_max_rows"].startswith(f"{bounds[0]}:") and why["nf4_tiles_max_rows"].startswith(
        f"{bounds[1]}:"
    )


def test_a_candidate_that_lost_twice_to_a_flatter_one_is_not_timed_again(monkeypatch) -> None:
    """int8 is steepest, then tiles, then dequantise + GEMM: times here are made up, by row count."""
    made_up = {"int8": lambda r: r, "tiles": lambda r: 10 + r / 4, "dequantise": lambda r: 60 + r / 100}
    timed: list[tuple[str, int]] = []

    def fake_best_ms(fn, repeats: int = 5) -> float:
        return fn()

    monkeypatch.setattr(cpu, "_best_ms", fake_best_ms)
    candidates = {
        name: (lambda x, name=name: timed.append((name, x.shape[0])) or made_up[name](x.shape[0])) for name in made_up
    }
    timings: dict[str, float] = {}
    winners = cpu._nf4_row_winners(candidates, torch.float32, timings)
    assert winners == ["int8"] * 2 + ["tiles"] * 4 + ["dequantise"] * 3
    assert max(r for name, r in timed if name == "int8") == 32  # lost at 16 and 32 rows
    assert max(r for name, r in timed if name == "tiles") == 512  # lost at 256 and 512
    assert {r for name, r in timed if name == "dequantise"} == set(cpu._NF4_ROW_SAMPLES)
    assert timings["nf4_tiles_64rows"] == 26.0
