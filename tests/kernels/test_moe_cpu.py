"""Routed experts of many tokens on CPU by each path the CPU plan can choose, against the fp32 reference:
`grouped_experts` (bf16 stacks: one native call; torch's GEMM per expert) and `moe_cpu` (NF4: bf16 tiles,
the fused int8 kernel, dequantise + GEMM)."""

from __future__ import annotations

import inspect

import pytest
import torch

from kimivl_cli.kernels import native
from kimivl_cli.kernels.moe_cpu import grouped_experts, grouped_experts_reference, linear, moe_cpu
from kimivl_cli.kernels.reference import fused_moe_reference


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


def _case(t: int, k: int, e: int, h: int, i: int, skip: int, random_routing):
    gen = torch.Generator().manual_seed(t)
    gate, up = ((torch.randn(e, i, h, generator=gen) * 0.1).bfloat16() for _ in range(2))
    down = (torch.randn(e, h, i, generator=gen) * 0.1).bfloat16()
    idx, w = random_routing(t, k, e, seed=t, skip=skip)
    return torch.randn(t, h, generator=gen).bfloat16(), idx, w, gate, up, down


# (tokens, top-k, experts, hidden, inter, experts left without tokens)
CASES = [(5, 3, 8, 128, 64, 0), (3, 2, 16, 64, 128, 10), (40, 6, 16, 128, 96, 3), (70, 2, 4, 64, 64, 0)]


@pytest.mark.parametrize("native_rows", [0, 1 << 20], ids=["torch", "native"])
@pytest.mark.parametrize(("t", "k", "e", "h", "i", "skip"), CASES)
def test_grouped_experts_every_path_matches_reference(cpu_plan, random_routing, native_rows, t, k, e, h, i, skip) -> None:  # fmt: skip
    if native_rows and not native.available():
        pytest.skip("no native kernels here")
    cpu_plan(bf16_moe_max_rows=native_rows)
    x, idx, w, gate, up, down = _case(t, k, e, h, i, skip, random_routing)
    ref = fused_moe_reference(x.float(), idx, w, gate.float(), up.float(), down.float())
    got = grouped_experts(x, idx, w, gate, up, down)
    assert got.dtype == torch.float32 and got.shape == (t, h)
    # torch's path rounds each bf16 GEMM's output; the native one only x and h (or nothing): both well inside
    assert _rel(got, ref) < 1e-2
    if not native_rows:
        assert torch.equal(got, grouped_experts_reference(x, idx, w, gate, up, down, linear))
    assert torch.equal(moe_cpu(x, idx, w, gate, up, down), got)  # the CPU MoEKernel takes stacks too


def test_grouped_experts_takes_the_reference_for_fp32_stacks(cpu_plan, random_routing) -> None:
    """Only bf16 stacks go native; fp32 weights (the reference checkpoints) stay exact."""
    cpu_plan(bf16_moe_max_rows=1 << 20)
    x, idx, w, gate, up, down = _case(9, 2, 4, 64, 64, 0, random_routing)
    gate, up, down = gate.float(), up.float(), down.float()
    ref = fused_moe_reference(x.float(), idx, w, gate, up, down)
    assert _rel(grouped_experts(x.float(), idx, w, gate, up, down), ref) < 1e-6


@pytest.mark.parametrize(
    ("tiles_from", "fused_max", "tiles_max"),
    [(1, 0, 0), (1 << 20, 1 << 20, 0), (1 << 20, 0, 0), (1 << 20, 0, 1 << 20)],
    ids=["bf16_tiles", "int8", "dequantise", "per_expert_bf16_tile_products"],
)
def test_nf4_moe_every_path_matches_reference(cpu_plan, make_experts, random_routing, tiles_from, fused_max, tiles_max) -> None:  # fmt: skip
    if not native.available() and (tiles_from == 1 or fused_max or tiles_max):
        pytest.skip("no native kernels here")
    cpu_plan(nf4_moe_bf16_min_rows=tiles_from, nf4_fused_max_rows=fused_max, nf4_tiles_max_rows=tiles_max)
    experts = make_experts(8, 128, 64, seed=2)
    idx, w = random_routing(40, 3, 8, seed=2)
    x = torch.randn(40, 128, generator=torch.Generator().manual_seed(1)).bfloat16()
    ref = fused_moe_reference(x.float(), idx, w, *[d.cpu() for d in experts.dense])
    got = moe_cpu(x, idx, w, *[(p.cpu(), a.cpu()) for p, a in experts.packed])
    assert _rel(got, ref) < 3e-2  # bf16 weights and activations (tiles), int8 activations (fused)


def test_both_moe_kernels_have_the_one_signature() -> None:
    """`moe_cpu` and `moe_triton.fused_moe` are the two `MoEKernel`s: same parameters, same order."""
    pytest.importorskip("triton")
    from kimivl_cli.kernels.moe import MoEKernel
    from kimivl_cli.kernels.moe_triton import fused_moe

    def params(fn) -> list[tuple[str, object]]:
        return [(p.name, p.annotation) for p in inspect.signature(fn).parameters.values() if p.name != "self"]

    assert params(moe_cpu) == params(fused_moe) == params(MoEKernel.__call__)
