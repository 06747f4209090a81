"""The full-size Kimi-VL language model (16B parameters) in NF4 on this CPU, built in memory.

No checkpoint file (`kimivl_cli.testing.random_nf4`): random NF4 codes by default (~3 s for all
16B); with `--quantize`, Gaussian bf16 weights quantized through the loader hook, the real
quantize-on-load path (~6 min on 2 cores). Either way at most one bf16 tensor exists at a time.

Reports peak RSS (must stay well within 24 GB), the weights' bytes, and batch-1 decode tokens/s
after a short prefill.

    .venv/bin/python benchmarks/fullsize_cpu.py [--json] [--decode N] [--prefill N] [--quantize]
"""

from __future__ import annotations

import argparse
import json
import resource
import time

import torch

from kimivl_cli.model.cache import LatentCache
from kimivl_cli.model.config import TextConfig
from kimivl_cli.quant.footprint import nf4_footprint_bytes
from kimivl_cli.testing.random_nf4 import random_nf4_language_model


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9  # Linux reports KiB


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--prefill", type=int, default=16, help="prompt tokens before decoding")
    parser.add_argument("--decode", type=int, default=4, help="decode steps timed")
    parser.add_argument("--quantize", action="store_true", help="quantize Gaussian weights (slow) instead of codes")
    args = parser.parse_args()
    cfg = TextConfig()
    t0 = time.perf_counter()
    lm = random_nf4_language_model(cfg, args.quantize)
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
