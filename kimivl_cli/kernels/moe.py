"""The one signature of a routed-experts kernel, which the CPU path (`moe_cpu.moe_cpu`) and the GPU
path (`moe_triton.fused_moe`) both implement; the experts modules call one of them, chosen when the
model is placed on its device.

Legend: T tokens, H hidden, I expert intermediate, E experts, K experts per token.
"""

from __future__ import annotations

from typing import Protocol

import torch

ExpertWeights = torch.Tensor | tuple[torch.Tensor, torch.Tensor]
"""One projection of every expert: a stack [E, N, Kd] (bf16 / fp32), or NF4 (packed [E, N, Kd/2] uint8,
absmax [E, N, Kd/64] fp32)."""


class MoEKernel(Protocol):
    def __call__(
        self,
        x: torch.Tensor,
        idx: torch.Tensor,
        weights: torch.Tensor,
        gate: ExpertWeights,
        up: ExpertWeights,
        down: ExpertWeights,
    ) -> torch.Tensor:
        """x [T, H], idx [T, K] expert ids, weights [T, K] fp32; gate/up [E, I, H], down [E, H, I]
        -> sum_k weights·down(silu(gate(x)) · up(x)) [T, H], accumulated in fp32. Reads only the
        experts that received tokens."""
        ...
