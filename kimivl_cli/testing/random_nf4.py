"""A language model in NF4 with random weights, built in place: for benchmarks and tests at any size.

No checkpoint file: the model is built on the meta device, its linears and routed experts are
swapped for NF4 modules, and each tensor is filled on its own, so at most one bf16 tensor exists
at a time (the full 16B architecture fits in ~10 GB this way).
"""

from __future__ import annotations

import math

import torch

from kimivl_cli.model.config import TextConfig
from kimivl_cli.model.language import LanguageModel
from kimivl_cli.model.weights import checkpoint_targets, materialize
from kimivl_cli.quant.modules import quantize_linears_


@torch.no_grad()
def random_nf4_language_model(cfg: TextConfig, quantize: bool = False, seed: int = 0) -> LanguageModel:
    """The NF4 language model of `cfg` on CPU, weights random.

    By default random NF4 codes with a fixed absmax (~2.5 sigma of N(0, 1/fan_in): fast, ~3 s for
    all 16B). With `quantize`, each quantized tensor is drawn as a bf16 Gaussian N(0, 1/fan_in) and
    quantized through the loader hook, the real quantize-on-load path (~6 min for 16B on 2 cores).
    Embeddings, lm_head, norms and routers stay bf16 (the routers fp32), as when loading.
    """
    with torch.device("meta"):
        lm = LanguageModel(cfg)
    quantize_linears_(lm, "nf4", device="meta")
    materialize(lm, torch.bfloat16, "cpu")
    gen = torch.Generator().manual_seed(seed)
    if quantize:  # every quantized tensor through its loader hook, as a checkpoint would arrive
        for target in checkpoint_targets(lm).values():
            if target.hook:
                fan_in = target.shape[-1]
                w = torch.randn(target.shape, generator=gen).div_(math.sqrt(fan_in)).to(torch.bfloat16)
                target.module.load_tensor(target.name, w)
    for name, t in [*lm.named_parameters(), *lm.named_buffers()]:
        if t.dtype == torch.uint8:
            if not quantize:
                t.random_(0, 256, generator=gen)
        elif name.endswith("absmax"):
            if not quantize:
                t.fill_(2.5 / math.sqrt(t.shape[-1] * 64))
        elif "norm" in name:
            t.fill_(1.0)
        elif name.endswith("e_score_correction_bias"):
            t.zero_()
        elif t.is_floating_point():
            t.normal_(0, 1 / math.sqrt(t.shape[-1]), generator=gen)
    return lm.eval()
