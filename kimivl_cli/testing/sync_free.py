"""A sync-free CPU version of the routed experts, so a CPU decode step can be traced into one graph.

On CUDA the step's experts are the Triton kernel (`TritonExperts`), which never syncs; the CPU
module groups by expert on the host (`.tolist()`), which a graph cannot hold. `GatheredExperts` stands
in for it where a test compiles a CPU step to prove the rest of the step capturable.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kimivl_cli.model.hooks import twin
from kimivl_cli.model.language import RoutedExperts


class GatheredExperts(RoutedExperts):
    """Sync-free for a few tokens: gather the T·K active experts' weights (a copy) and batch the GEMVs."""

    def forward(self, x: Tensor, idx: Tensor, weights: Tensor) -> Tensor:
        T, K = idx.shape
        xs = x.repeat_interleave(K, dim=0)[:, :, None]  # [T*K, D, 1]
        flat = idx.flatten()
        h = F.silu(torch.bmm(self.gate_proj[flat], xs)) * torch.bmm(self.up_proj[flat], xs)  # [T*K, I, 1]
        y = torch.bmm(self.down_proj[flat], h).view(T, K, -1)
        return (y.float() * weights[..., None]).sum(1)


def with_gathered_experts(model: nn.Module) -> nn.Module:
    """A copy of `model` whose `RoutedExperts` gather (weights are shared, not copied)."""
    copied = copy.copy(model)
    copied._modules = dict(model._modules)
    for name, child in model.named_children():
        if type(child) is RoutedExperts:
            copied._modules[name] = twin(child, GatheredExperts)
        else:
            copied._modules[name] = with_gathered_experts(child)
    return copied
