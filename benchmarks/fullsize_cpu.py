"""The full-size Kimi-VL language model (16B parameters) on this CPU: kimivl NF4 beside llama.cpp Q4_K_M.

    .venv/bin/python benchmarks/fullsize_cpu.py [--json] [--prefill N] [--decode N] [--rounds N] [--threads N]
        [--kimivl-only] [--quantize]

Both models have random weights, built without any bf16 checkpoint: kimivl's in memory
(`kimivl_cli.testing.random_nf4`: random NF4 codes, ~3 s; with `--quantize`, Gaussian bf16 weights
quantized through the loader hook, ~6 min), llama.cpp's as a Q4_K_M GGUF written directly with random
blocks of the types llama.cpp's own Q4_K_M recipe picks (`testing/gguf_twin.write_random_q4_k_m`, ~10 GB,
cached in $KIMIVL_CACHE/gguf). kimivl decodes as its engine does (the native whole-token step where the
kernels run). Each engine runs in its own process, one at a time (each needs ~10 GB),
rounds interleaved: prefill tok/s to the first logits, greedy decode tok/s, peak RSS. llama.cpp reads the
file into memory (no mmap, like kimivl's weights) and runs with its extra weight layouts off (`--no-repack`).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kimivl_cli.engine.cpu_decode import NativeDecoder
from kimivl_cli.kernels import cpu
from kimivl_cli.model.cache import LatentCache
from kimivl_cli.model.config import TextConfig
from kimivl_cli.testing.footprint import nf4_footprint_bytes


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9  # Linux reports KiB


def prompt_ids(cfg: TextConfig, n: int) -> torch.Tensor:
    return torch.randint(0, cfg.vocab_size - 256, (n,), generator=torch.Generator().manual_seed(1))


@torch.inference_mode()
def kimivl_worker(prefill: int, decode: int, quantize: bool) -> dict:
    from kimivl_cli.testing.random_nf4 import random_nf4_language_model

    cfg = TextConfig()
    t0 = time.perf_counter()
    lm = random_nf4_language_model(cfg, quantize)
    result: dict = {
        "build_s": round(time.perf_counter() - t0, 1),
        "weights_gb": round(sum(t.nbytes for t in [*lm.parameters(), *lm.buffers()]) / 1e9, 3),
        "computed_nf4_gb": round(nf4_footprint_bytes(cfg) / 1e9, 3),
    }

    decoder = NativeDecoder.build(lm)  # the engine's batch-1 decode step where the kernels run it
    result["decode_path"] = "native step" if decoder else "torch modules"

    def step(tok: torch.Tensor, pos: int, cache: LatentCache) -> torch.Tensor:
        if decoder is not None:
            return decoder.step(int(tok), pos, cache).argmax(-1, keepdim=True)
        return lm.logits(lm(lm.embed(tok), pos, cache)[:, -1]).argmax(-1, keepdim=True)

    def generate(ids: torch.Tensor, new: int) -> tuple[float, float]:
        cache = LatentCache(cfg, 1, ids.shape[0] + new + 1, torch.bfloat16, "cpu")
        t0 = time.perf_counter()
        tok = lm.logits(lm(lm.embed(ids[None]), 0, cache)[:, -1]).argmax(-1, keepdim=True)
        t1 = time.perf_counter()
        for pos in range(ids.shape[0], ids.shape[0] + new - 1):
            tok = step(tok, pos, cache)
        return t1 - t0, time.perf_counter() - t1

    ids = prompt_ids(cfg, prefill)
    generate(ids[:8], 2)  # warm-up: the CPU plan, first-call allocations, thread pools
    prefill_s, decode_s = generate(ids, decode)
    return {
        **result,
        "prefill_tok_s": prefill / prefill_s,
        "decode_tok_s": decode / decode_s,
        "peak_rss_gb": peak_rss_gb(),
    }


def llama_worker(path: Path, prefill: int, decode: int, threads: int) -> dict:
    from kimivl_cli.testing.gguf_twin import LlamaCpp

    ids = prompt_ids(TextConfig(), prefill).tolist()
    t0 = time.perf_counter()
    llama = LlamaCpp(path, threads, context=prefill + decode + 8, batch=prefill, mmap=False)
    result = {"load_s": round(time.perf_counter() - t0, 1)}
    llama.generate(ids[:8], 2)
    _, _, prefill_s, decode_s = llama.generate(ids, decode)
    llama.close()
    return {
        **result,
        "prefill_tok_s": prefill / prefill_s,
        "decode_tok_s": decode / decode_s,
        "peak_rss_gb": peak_rss_gb(),
    }


def q4_k_m_file() -> Path:
    """The full-size random Q4_K_M GGUF, written once (~10 GB) and kept in $KIMIVL_CACHE/gguf."""
    from kimivl_cli.kernels.native import cache_dir
    from kimivl_cli.testing.gguf_twin import write_random_q4_k_m

    path = cache_dir() / "gguf" / "kimi-vl-a3b-random-Q4_K_M.gguf"
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        types = write_random_q4_k_m(TextConfig(), tmp)
        tmp.rename(path)
        print(f"wrote {path} ({path.stat().st_size / 1e9:.2f} GB; tensor types {types})", file=sys.stderr)
    return path


def run_worker(args: argparse.Namespace, engine: str, path: Path | None) -> dict:
    cmd = [sys.executable, __file__, "--worker", engine, "--prefill", str(args.prefill), "--decode", str(args.decode),
           "--threads", str(args.threads), *(["--gguf", str(path)] if path else []),
           *(["--quantize"] if args.quantize else [])]  # fmt: skip
    out = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"{engine} worker failed: {out.stderr.strip().splitlines()[-1:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--prefill", type=int, default=64, help="prompt tokens")
    parser.add_argument("--decode", type=int, default=16, help="greedy tokens generated")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--quantize", action="store_true", help="quantize Gaussian weights (slow) instead of codes")
    parser.add_argument("--kimivl-only", action="store_true", help="no llama.cpp (needs no gguf / llama-cpp-python)")
    parser.add_argument("--worker", choices=["kimivl", "llama"], help=argparse.SUPPRESS)
    parser.add_argument("--gguf", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.worker == "kimivl":
        print(json.dumps(kimivl_worker(args.prefill, args.decode, args.quantize)))
        return 0
    if args.worker == "llama":
        print(json.dumps(llama_worker(args.gguf, args.prefill, args.decode, args.threads)))
        return 0
    path = None if args.kimivl_only else q4_k_m_file()
    engines = ["kimivl_nf4", *([] if args.kimivl_only else ["llama_Q4_K_M"])]
    runs: dict[str, list[dict]] = {name: [] for name in engines}
    for r in range(args.rounds):
        for name in engines:
            runs[name].append(run_worker(args, "kimivl" if name == "kimivl_nf4" else "llama", path))
            got = runs[name][-1]
            print(f"round {r + 1}: {name:>13} prefill {got['prefill_tok_s']:6.2f} tok/s  decode "
                  f"{got['decode_tok_s']:5.2f} tok/s  peak RSS {got['peak_rss_gb']:.2f} GB", file=sys.stderr)  # fmt: skip
    report: dict = {
        "threads": args.threads,
        "prefill_tokens": args.prefill,
        "decode_tokens": args.decode,
        "rounds": args.rounds,
        "cpu_flags": sorted(f for f in cpu.features() if f.startswith(("avx", "amx", "fma", "asimd", "sve"))),
        "load_average": os.getloadavg()[0],
    }
    for name, values in runs.items():
        report[name] = {
            key: round(statistics.median(v[key] for v in values), 3)
            for key in ("prefill_tok_s", "decode_tok_s", "peak_rss_gb")
        } | {
            k: v
            for k, v in values[-1].items()
            if k.endswith(("_s", "_gb", "_path")) and "tok" not in k and k != "peak_rss_gb"
        }
    if not args.kimivl_only:
        for phase in ("prefill", "decode"):
            ratio = report["kimivl_nf4"][f"{phase}_tok_s"] / report["llama_Q4_K_M"][f"{phase}_tok_s"]
            report[f"{phase}_ratio_vs_q4_k_m"] = round(ratio, 2)
    if args.json:
        print(json.dumps(report))
    else:
        print(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
