"""Kernel tests run the real Triton kernels: on a GPU if present, else under the Triton interpreter.

The interpreter switch (TRITON_INTERPRET) is set in the root conftest, before anything imports triton.
"""

from __future__ import annotations

import pytest
import torch

from kimivl_cli.weight_formats import NF4Tensor, dequantize_nf4, quantize_nf4


@pytest.fixture(scope="session")
def device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


class Experts:
    """Random NF4 experts plus their dequantised copies (what the reference multiplies)."""

    def __init__(self, n_experts: int, hidden: int, inter: int, device: str, seed: int = 0) -> None:
        gen = torch.Generator().manual_seed(seed)
        self.q: list[NF4Tensor] = [
            quantize_nf4((torch.randn(shape, generator=gen) * 0.05).to(device))
            for shape in ((n_experts, inter, hidden), (n_experts, inter, hidden), (n_experts, hidden, inter))
        ]
        self.dense = [dequantize_nf4(t, torch.float32) for t in self.q]

    @property
    def packed(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        return [(t.packed, t.absmax) for t in self.q]


@pytest.fixture
def make_experts(device: str):
    return lambda e, h, i, seed=0: Experts(e, h, i, device, seed)


def _random_routing(t: int, k: int, e: int, seed: int = 0, skip: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Distinct experts per token drawn from the first e - skip experts (the rest get no tokens)."""
    gen = torch.Generator().manual_seed(seed)
    idx = torch.stack([torch.randperm(e - skip, generator=gen)[:k] for _ in range(t)])
    return idx, torch.rand(t, k, generator=gen) + 0.1


@pytest.fixture
def random_routing():
    return _random_routing
