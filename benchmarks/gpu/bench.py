"""GPU benchmark (run through run.sh): fused NF4 MoE, dense NF4 GEMV, full-size random NF4 model.

Prints one JSON object. Every section catches its own failure and records it under "errors",
so one broken part never hides the others' numbers. Sections:
- moe: one real-size MoE layer (64 experts, 2048 -> 1408, top-6) for 1 and 512 tokens:
  Triton fused NF4 vs the naive per-expert loop (bf16) vs bf16 grouped/gathered matmul
  (the language model's own `RoutedExperts`).
- dense: batch-1 NF4 GEMV at Kimi-VL's shapes: our Triton kernel vs bitsandbytes
  `matmul_4bit` vs bf16 `F.linear` (keep the fastest per shape in NF4Linear).
- model: the full-size language model with random NF4 weights made on the GPU (no file):
  peak VRAM, prefill tokens/s at 4096 tokens, batch-1 decode tokens/s.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import traceback

import torch
import torch.nn.functional as F

DEV = "cuda"
RESULT: dict = {"errors": {}}


def cuda_ms(fn, runs: int = 20, warmup: int = 3) -> float:
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(runs):
        fn()
    end.record()
    torch.cuda.synchronize()
    return round(start.elapsed_time(end) / runs, 4)


def random_nf4(*shape: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Random NF4 weight [..., N, K] straight on the GPU: random codes, absmax ~ 2.5 sigma of 0.02."""
    packed = torch.randint(0, 256, (*shape[:-1], shape[-1] // 2), dtype=torch.uint8, device=DEV)
    absmax = torch.full((*shape[:-1], shape[-1] // 64), 0.05, device=DEV)
    return packed, absmax


def section(name: str):
    def wrap(fn):
        def run(*args):
            t0 = time.time()
            try:
                fn(*args)
            except Exception as exc:
                RESULT["errors"][name] = f"{type(exc).__name__}: {exc}\n{traceback.format_exc()[-1500:]}"
            RESULT.setdefault("section_seconds", {})[name] = round(time.time() - t0, 1)
            torch.cuda.empty_cache()

        return run

    return wrap


@section("moe")
def bench_moe() -> None:
    from kimivl_cli.kernels.moe_triton import fused_moe_nf4
    from kimivl_cli.kernels.reference import fused_moe_reference
    from kimivl_cli.model.language import RoutedExperts
    from kimivl_cli.quant.nf4 import NF4Tensor, dequantize_nf4

    e, h, i, k = 64, 2048, 1408, 6
    nf4 = [random_nf4(e, i, h), random_nf4(e, i, h), random_nf4(e, h, i)]
    dense = [dequantize_nf4(NF4Tensor(p, a, torch.bfloat16)) for p, a in nf4]
    bf16 = RoutedExperts(e, h, i).to(DEV, torch.bfloat16)
    with torch.no_grad():
        for name, w in zip(("gate_proj", "up_proj", "down_proj"), dense, strict=True):
            getattr(bf16, name).copy_(w)
    out = {}
    for t in (1, 512):
        x = torch.randn(t, h, device=DEV, dtype=torch.bfloat16)
        idx = torch.stack([torch.randperm(e, device=DEV)[:k] for _ in range(t)])
        w = torch.rand(t, k, device=DEV)
        ref = fused_moe_reference(x, idx, w, *dense).float()
        got = fused_moe_nf4(x, idx, w, *nf4).float()
        out[f"rel_err_{t}tok"] = float((got - ref).norm() / ref.norm())
        with torch.inference_mode():
            out[f"triton_nf4_ms_{t}tok"] = cuda_ms(lambda x=x, idx=idx, w=w: fused_moe_nf4(x, idx, w, *nf4))
            out[f"naive_loop_bf16_ms_{t}tok"] = cuda_ms(
                lambda x=x, idx=idx, w=w: fused_moe_reference(x, idx, w, *dense), runs=5
            )
            out[f"bf16_grouped_ms_{t}tok"] = cuda_ms(lambda x=x, idx=idx, w=w: bf16(x, idx, w), runs=10)
    # CUDA-graph capture of the decode-size call proves there is no host sync in the path.
    x1 = torch.randn(1, h, device=DEV, dtype=torch.bfloat16)
    idx1, w1 = torch.randperm(e, device=DEV)[:k].view(1, k), torch.rand(1, k, device=DEV)
    fused_moe_nf4(x1, idx1, w1, *nf4)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y1 = fused_moe_nf4(x1, idx1, w1, *nf4)
    graph.replay()
    torch.cuda.synchronize()
    out["cuda_graph_ok"] = bool(torch.allclose(y1.float(), fused_moe_nf4(x1, idx1, w1, *nf4).float(), atol=1e-3))
    out["cuda_graph_ms_1tok"] = cuda_ms(graph.replay)
    RESULT["moe"] = out


@section("dense")
def bench_dense() -> None:
    import bitsandbytes as bnb
    import bitsandbytes.functional as bnbf

    from kimivl_cli.kernels.moe_triton import nf4_matmul
    from kimivl_cli.quant.nf4 import quantize_nf4

    shapes = {"q_proj": (3072, 2048), "kv_a": (576, 2048), "kv_b": (4096, 512), "o_proj": (2048, 2048),
              "shared_up": (2816, 2048), "shared_down": (2048, 2816), "dense_up": (11264, 2048)}  # fmt: skip
    out = {}
    for name, (n, kd) in shapes.items():
        w = torch.randn(n, kd, device=DEV, dtype=torch.bfloat16) * 0.02
        x = torch.randn(1, kd, device=DEV, dtype=torch.bfloat16)
        q = quantize_nf4(w)
        qb, state = bnbf.quantize_4bit(w, blocksize=64, quant_type="nf4")
        row = {
            "bf16_us": cuda_ms(lambda w=w, x=x: F.linear(x, w), runs=100) * 1e3,
            "triton_nf4_us": cuda_ms(lambda q=q, x=x: nf4_matmul(x, q.packed, q.absmax), runs=100) * 1e3,
            "bnb_nf4_us": cuda_ms(lambda qb=qb, state=state, x=x: bnb.matmul_4bit(x, qb.t(), state), runs=100) * 1e3,
        }
        ref = F.linear(x, w).float()
        row["triton_rel_err"] = float((nf4_matmul(x, q.packed, q.absmax).float() - ref).norm() / ref.norm())
        out[name] = {key: round(v, 3) for key, v in row.items()}
    RESULT["dense"] = out


@section("model")
def bench_model(prefill_len: int, decode_steps: int) -> None:
    from kimivl_cli.model.cache import LatentCache
    from kimivl_cli.model.config import TextConfig
    from kimivl_cli.model.language import LanguageModel
    from kimivl_cli.model.weights import materialize
    from kimivl_cli.quant.footprint import nf4_footprint_bytes
    from kimivl_cli.quant.modules import quantize_linears_

    cfg = TextConfig()
    torch.cuda.reset_peak_memory_stats()
    with torch.device("meta"):
        lm = LanguageModel(cfg)
    quantize_linears_(lm, "nf4", device="meta")
    materialize(lm, torch.bfloat16, DEV)
    gen = torch.Generator(DEV).manual_seed(0)
    with torch.no_grad():
        for name, t in list(lm.named_parameters()) + list(lm.named_buffers()):
            if t.dtype == torch.uint8:
                t.random_(0, 256, generator=gen)
            elif name.endswith("absmax"):
                t.fill_(0.05)
            elif "norm" in name:
                t.fill_(1.0)
            elif name.endswith("e_score_correction_bias"):
                t.zero_()
            elif t.is_floating_point() and t.dim() >= 2:
                t.normal_(0, 0.02, generator=gen)
    lm.eval()
    weights_bytes = sum(t.nbytes for t in lm.parameters()) + sum(t.nbytes for t in lm.buffers())
    out = {"weights_gb": round(weights_bytes / 1e9, 3), "computed_nf4_gb": round(nf4_footprint_bytes(cfg) / 1e9, 3)}
    cache = LatentCache(cfg, 1, prefill_len + decode_steps + 8, device=DEV)
    ids = torch.randint(0, cfg.vocab_size, (1, prefill_len), device=DEV)
    with torch.inference_mode():
        lm(lm.embed(ids[:, :64]), 0, cache)  # warm-up: compiles the Triton kernels
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        h = lm(lm.embed(ids), 0, cache)
        tok = lm.logits(h[:, -1]).argmax(-1, keepdim=True)
        torch.cuda.synchronize()
        out["prefill_tokens_per_s"] = round(prefill_len / (time.perf_counter() - t0), 1)
        out["prefill_len"] = prefill_len
        pos = prefill_len
        for step in range(decode_steps + 2):
            if step == 2:  # first two steps warm up the decode tile configs
                torch.cuda.synchronize()
                t0 = time.perf_counter()
            h = lm(lm.embed(tok), pos, cache)
            tok = lm.logits(h[:, -1]).argmax(-1, keepdim=True)
            pos += 1
        torch.cuda.synchronize()
        out["decode_tokens_per_s"] = round(decode_steps / (time.perf_counter() - t0), 2)
    out["peak_vram_gb"] = round(torch.cuda.max_memory_allocated() / 1e9, 3)
    RESULT["model"] = out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--skip-model", action="store_true")
    parser.add_argument("--prefill", type=int, default=4096)
    parser.add_argument("--decode", type=int, default=32)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print(json.dumps({"error": "no CUDA device"}))
        sys.exit(1)
    RESULT["device"] = torch.cuda.get_device_name()
    RESULT["torch"] = torch.__version__
    bench_moe()
    bench_dense()
    if not args.skip_model:
        bench_model(args.prefill, args.decode)
    print(json.dumps(RESULT, indent=1))


if __name__ == "__main__":
    main()
