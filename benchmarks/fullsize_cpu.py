"""The full-size Kimi-VL language model (16B parameters) in NF4 on this CPU, built in memory.

No checkpoint file: the model is built on the meta device, its linears and routed experts are
swapped for NF4 modules, and each quantized tensor is filled on its own. By default with random
NF4 codes and a fixed absmax (a random NF4 weight, ~3 s for all 16B); with `--quantize`, each
tensor is drawn as a bf16 Gaussian N(0, 1/fan_in) and quantized at once through the loader hook
(the real quantize-on-load path; ~6 min of quantization on 2 cores). Either way at most one bf16
tensor exists at a time. Embeddings, lm_head, norms and routers are bf16 (the routers fp32).

Reports peak RSS (must stay well within 24 GB), the weights' bytes, and batch-1 decode tokens/s
after a short prefill.

    .venv/bin/python benchmarks/fullsize_cpu.py [--json] [--decode N] [--prefill N] [--quantize]
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import time

import torch

from kimivl_cli.model.cache import LatentCache
from kimivl_cli.model.config import TextConfig
from kimivl_cli.model.language import LanguageModel
from kimivl_cli.model.weights import checkpoint_targets, materialize
from kimivl_cli.quant.footprint import nf4_footprint_bytes
from kimivl_cli.quant.modules import quantize_linears_


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9  # Linux reports KiB


@torch.no_grad()
def build(cfg: TextConfig, quantize: bool) -> LanguageModel:
    """The NF4 language model with random weights; peak extra memory: one bf16 tensor."""
    with torch.device("meta"):
        lm = LanguageModel(cfg)
    quantize_linears_(lm, "nf4", device="meta")
    materialize(lm, torch.bfloat16, "cpu")
    gen = torch.Generator().manual_seed(0)
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
                t.fill_(2.5 / math.sqrt(t.shape[-1] * 64))  # ~2.5 sigma of N(0, 1/fan_in)
        elif "norm" in name:
            t.fill_(1.0)
        elif name.endswith("e_score_correction_bias"):
            t.zero_()
        elif t.is_floating_point():
            t.normal_(0, 1 / math.sqrt(t.shape[-1]), generator=gen)
    return lm.eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--prefill", type=int, default=16, help="prompt tokens before decoding")
    parser.add_argument("--decode", type=int, default=4, help="decode steps timed")
    parser.add_argument("--quantize", action="store_true", help="quantize Gaussian weights (slow) instead of codes")
    args = parser.parse_args()
    cfg = TextConfig()
    t0 = time.perf_counter()
    lm = build(cfg, args.quantize)
    result: dict[str, float | int | bool] = {
        "threads": torch.get_num_threads(),
        "quantized_on_load": args.quantize,
        "build_s": round(time.perf_counter() - t0, 1),
        "weights_gb": round(sum(t.nbytes for t in [*lm.parameters(), *lm.buffers()]) / 1e9, 3),
        "computed_nf4_gb": round(nf4_footprint_bytes(cfg) / 1e9, 3),
        "rss_after_build_gb": round(peak_rss_gb(), 2),
    }
    cache = LatentCache(cfg, 1, args.prefill + args.decode + 2, torch.bfloat16, "cpu")
    ids = torch.randint(0, cfg.vocab_size, (1, args.prefill), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        t0 = time.perf_counter()
        tok = lm.logits(lm(lm.embed(ids), 0, cache)[:, -1]).argmax(-1, keepdim=True)
        result["prefill_tokens"] = args.prefill
        result["prefill_tokens_per_s"] = round(args.prefill / (time.perf_counter() - t0), 2)
        pos = args.prefill
        tok = lm.logits(lm(lm.embed(tok), pos, cache)[:, -1]).argmax(-1, keepdim=True)  # warm-up step
        pos += 1
        t0 = time.perf_counter()
        for _ in range(args.decode):
            tok = lm.logits(lm(lm.embed(tok), pos, cache)[:, -1]).argmax(-1, keepdim=True)
            pos += 1
        result["decode_tokens"] = args.decode
        result["decode_tokens_per_s"] = round(args.decode / (time.perf_counter() - t0), 3)
    result["peak_rss_gb"] = round(peak_rss_gb(), 2)
    if args.json:
        print(json.dumps(result))
    else:
        for key, value in result.items():
            print(f"{key:>22}: {value}")


if __name__ == "__main__":
    main()
