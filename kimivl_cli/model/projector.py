"""The multi-modal projector (`multi_modal_projector.*`): merged vision tokens -> LM embeddings.

Legend: T image tokens (one per `<|media_pad|>`), M sub-patches per token (2x2 = 4), D vision hidden,
E text hidden.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kimivl_cli.model.config import TextConfig, VisionConfig


class Projector(nn.Module):
    """LayerNorm each of the M sub-patch vectors, concatenate (sub-patch slow, channel fast), then
    Linear(M*D, M*D) -> exact erf GELU (not tanh, unlike the tower) -> Linear(M*D, E)."""

    def __init__(self, vision: VisionConfig, text: TextConfig) -> None:
        super().__init__()
        kh, kw = vision.merge_kernel_size
        wide = kh * kw * vision.hidden_size
        self.pre_norm = nn.LayerNorm(vision.hidden_size, eps=vision.layer_norm_eps)
        self.linear_1 = nn.Linear(wide, wide)
        self.linear_2 = nn.Linear(wide, text.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [T, M, D] -> [T, E]."""
        x = self.pre_norm(x).flatten(1)  # [T, M*D]
        return self.linear_2(F.gelu(self.linear_1(x)))
