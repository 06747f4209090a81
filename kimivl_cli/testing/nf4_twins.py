"""A random language model twice: dense, with every quantizable weight on the NF4 grid, and its
exact NF4 copy. The two compute the same function (NF4 re-quantizes a grid point exactly), so
any NF4 path can be checked against the plain module math of the dense twin to fp32 rounding.
"""

from __future__ import annotations

import math

import torch

from kimivl_cli.model.config import TextConfig
from kimivl_cli.model.language import LanguageModel
from kimivl_cli.model.weights import checkpoint_targets, materialize
from kimivl_cli.quant.modules import _QUANTIZED_MODULE, NF4Experts, quantize_linears_
from kimivl_cli.weight_formats import Int8Tensor, dequantize_nf4, quantize_nf4


def _build(cfg: TextConfig, dtype: torch.dtype, quant: str) -> LanguageModel:
    with torch.device("meta"):
        lm = LanguageModel(cfg)
    quantize_linears_(lm, quant, device="meta")
    materialize(lm, dtype, "cpu")
    return lm.eval().requires_grad_(False)


def _tensor(target) -> torch.Tensor:
    module, name = target.module, target.name
    return module.checkpoint_tensor(name) if target.hook else getattr(module, name)


@torch.no_grad()
def nf4_twins(
    cfg: TextConfig, dtype: torch.dtype = torch.float32, seed: int = 0
) -> tuple[LanguageModel, LanguageModel]:
    """(dense, nf4) language models of `cfg` on CPU with the same random weights (see module doc).

    Linear weights ~ N(0, 1/fan_in), norms 1 + 0.1 N, router bias 0.1 N; the router, embeddings,
    norms and lm_head are the same tensors' values in both (they are never quantized).
    """
    gen = torch.Generator().manual_seed(seed)
    dense = _build(cfg, dtype, "none")
    targets = checkpoint_targets(dense, "language_model.")
    for name, target in targets.items():
        t = _tensor(target)
        if "norm" in name:
            t.copy_(1 + 0.1 * torch.randn(t.shape, generator=gen))
        elif name.endswith("e_score_correction_bias"):
            t.copy_(0.1 * torch.randn(t.shape, generator=gen))
        else:
            w = torch.randn(t.shape, generator=gen) / math.sqrt(t.shape[-1])
            t.copy_(dequantize_nf4(quantize_nf4(w)) if should_quantize(name) else w)
    nf4 = _build(cfg, dtype, "nf4")
    for name, target in checkpoint_targets(nf4, "language_model.").items():
        value = _tensor(targets[name])
        if target.hook:
            target.module.load_tensor(target.name, value)
        else:
            getattr(target.module, target.name).copy_(value)
    return dense, nf4


def unpack_nf4_codes(packed: torch.Tensor) -> torch.Tensor:
    """`[..., K/2]` uint8 -> `[..., K]` int64 codes in weight order (high nibble first)."""
    return torch.stack((packed >> 4, packed & 0xF), dim=-1).flatten(-2).long()


def dequantize_int8(t: Int8Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """The full-precision weight of a per-row int8 tensor: q * scale."""
    return (t.q.float() * t.scale.unsqueeze(-1)).to(dtype or t.dtype)


def should_quantize(name: str) -> bool:
    """True for checkpoint tensors that are language-model linear weights (what `quantize_linears_` swaps)."""
    return (
        name.startswith("language_model.")
        and name.endswith(".weight")
        and _QUANTIZED_MODULE.search(name.removesuffix(".weight")) is not None
    )


def stacked_nf4_experts(gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor) -> NF4Experts:
    """`NF4Experts` from stacked weights gate/up [E, I, H], down [E, H, I], one expert matrix at a time."""
    n_experts, inter, hidden = gate.shape
    module = NF4Experts(n_experts, hidden, inter, gate.device)
    for e in range(n_experts):
        for name, w in zip(module.projections, (gate, up, down), strict=True):
            module.load_expert(name, e, w[e])
    return module
