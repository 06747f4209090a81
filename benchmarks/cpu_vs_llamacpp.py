"""kimivl vs llama.cpp on the CPU, same weights, same threads: the benchmark's `mid` checkpoint as GGUF.

    python benchmarks/cpu_vs_llamacpp.py [--json] [--setting short|long|both] [--rounds N] [--threads N]

Needs `gguf` and `llama-cpp-python` (`pip install gguf llama-cpp-python`; the second builds llama.cpp
from source: with CMAKE_ARGS="-DGGML_NATIVE=ON" for this CPU, about an hour on 2 busy cores).

1. Convert (once, cached beside the checkpoint): the bf16 `mid` checkpoint (1.1B, 64 experts top-6,
   MLA) -> deepseek2 GGUF in bf16 and f32 with the `gguf` writer (`kimivl_cli.testing.gguf_twin`),
   then llama.cpp's own quantizer -> Q4_K_M, Q4_0, Q8_0.
2. Faithfulness, before any timing: kimivl and llama.cpp on the same prompt ids, f32 against f32 and
   bf16 against bf16: greedy ids (16) and the prompt's last logits (relative L2 error).
3. Speed: prefill tok/s (to the first logits) and greedy decode tok/s with the same accounting for
   both, kimivl NF4 / bf16 against llama.cpp Q4_K_M / Q4_0 / Q8_0 / bf16, rounds interleaved (the
   machine may be shared), medians. llama.cpp runs with its extra weight layouts off (`--no-repack`):
   its AMX layout aborts on quantized deepseek2 models.
Prints JSON with the ratios, the CPU's flags and llama.cpp's own system info.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engine_cpu import nf4_checkpoint

from kimivl_cli.engine.engine import Engine
from kimivl_cli.engine.sampling import SamplingParams
from kimivl_cli.kernels import cpu
from kimivl_cli.model.config import KimiVLConfig
from kimivl_cli.testing.checkpoint import cached_checkpoint
from kimivl_cli.testing.gguf_twin import LlamaCpp, layout, q4_k_m_type, quantize, tensor_types, write_gguf

SETTINGS = {"short": (128, 16), "long": (1024, 128)}
LLAMA_TYPES = ("Q4_K_M", "Q4_0", "Q8_0", "bf16")
# the acceptance ratios (and the optional int8 head beside Q4_K_M's Q6_K one)
PAIRS = {"kimivl_nf4": "llama_Q4_K_M", "kimivl_nf4_int8_head": "llama_Q4_K_M", "kimivl_bf16": "llama_bf16"}


def gguf_files(folder: Path, threads: int) -> dict[str, Path]:
    """The mid checkpoint as GGUF: f32, bf16 (written here) and llama.cpp's quantizations of the bf16 one."""
    root = folder.with_name(folder.name + "-gguf")
    root.mkdir(exist_ok=True)
    files = {t: root / f"mid-{t}.gguf" for t in ("f32", *LLAMA_TYPES)}
    for dtype in ("f32", "bf16"):
        if not files[dtype].is_file():
            tmp = files[dtype].with_suffix(".tmp")
            write_gguf(folder, tmp, dtype)
            tmp.rename(files[dtype])
    for qtype in LLAMA_TYPES[:-1]:
        if not files[qtype].is_file():
            tmp = files[qtype].with_suffix(".tmp")
            quantize(files["bf16"], tmp, qtype, threads)
            tmp.rename(files[qtype])
    return files


def recipe_check(folder: Path, q4_k_m: Path) -> dict[str, int]:
    """How many of the real quantizer's Q4_K_M tensor types `q4_k_m_type` predicts (the full-size
    benchmark writes its Q4_K_M file by that rule)."""
    cfg = KimiVLConfig.from_file(folder / "config.json").text
    real = tensor_types(q4_k_m)
    predicted = {s.name: q4_k_m_type(s, cfg.num_hidden_layers) for s in layout(cfg)}
    same = sum(real.get(name) == kind for name, kind in predicted.items())
    return {"tensors": len(predicted), "types_predicted": same}


def _relative(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


@torch.inference_mode()
def kimivl_run(engine: Engine, prompt: torch.Tensor, new: int) -> tuple[list[int], np.ndarray, float, float]:
    """Greedy; -> ids, the prompt's last logits, prefill seconds, decode seconds (the engine's own timings)."""
    stream = engine.generate_ids(
        prompt, params=SamplingParams(temperature=0.0, max_new_tokens=new), stop_ids=(), keep_logits=True
    )
    ids = list(stream)
    return ids, stream.logits[0].numpy(), stream.stats.prefill_s, stream.stats.decode_s


def faithfulness(folder: Path, files: dict[str, Path], threads: int, prompts: int = 3, length: int = 16) -> dict:
    """kimivl and llama.cpp on the same prompt ids, one engine loaded at a time: f32 vs f32, bf16 vs bf16.

    llama.cpp reads the prompt one token at a time here (its decode path); its batched prompt path is
    reported beside it: on an AVX-512/AMX machine it disagreed with its own one-token path from 8
    prompt tokens on (13-36% of the f32 logits' norm) while the one-token path stayed within 0.15%.
    Short prompts: the random routers have near-ties (top-6 of 64 sigmoid scores), and one flipped expert
    choice at an early position moves every later logit; the longer the sequence, the likelier."""
    gen = torch.Generator().manual_seed(1)
    batch = [torch.randint(0, 32000, (length,), generator=gen) for _ in range(prompts)]
    report = {}
    for name, dtype in (("f32", torch.float32), ("bf16", torch.bfloat16)):
        engine = Engine.load(folder, dtype=dtype)
        ours = [kimivl_run(engine, p, 16)[:2] for p in batch]
        del engine
        gc.collect()
        llama = LlamaCpp(files[name], threads, context=64, batch=length)
        theirs = [llama.generate(p.tolist(), 16, one_by_one=True)[:2] for p in batch]
        batched = [llama.generate(p.tolist(), 16)[1] for p in batch]
        llama.close()
        errors = [_relative(t[1], o[1]) for o, t in zip(ours, theirs, strict=True)]
        batched_errors = [_relative(t, o[1]) for o, t in zip(ours, batched, strict=True)]
        agree = [next((i for i, (a, b) in enumerate(zip(o[0], t[0], strict=True)) if a != b), 16)
                 for o, t in zip(ours, theirs, strict=True)]  # fmt: skip
        report[name] = {
            "prompts": prompts,
            "prompt_tokens": length,
            "greedy_ids_agreeing_of_16": agree,
            "logits_relative_error": [round(e, 5) for e in errors],
            "logits_relative_error_llama_batched_prompt": [round(e, 5) for e in batched_errors],
        }
    return report


def speed(folder: Path, files: dict[str, Path], setting: str, rounds: int, threads: int) -> dict:
    prompt_len, new = SETTINGS[setting]
    prompt = torch.randint(0, 32000, (prompt_len,), generator=torch.Generator().manual_seed(0))
    kimivl = {
        "kimivl_nf4": Engine.load(nf4_checkpoint(folder), dtype=torch.bfloat16),
        # not the default (benchmarks/lm_head_quant.py): the head in int8 blocks, as Q4_K_M keeps it in Q6_K
        "kimivl_nf4_int8_head": Engine.load(nf4_checkpoint(folder), dtype=torch.bfloat16, lm_head="int8"),
        "kimivl_bf16": Engine.load(folder, dtype=torch.bfloat16),
    }
    for engine in kimivl.values():  # warm-up: first-call allocations, the CPU plan, thread pools
        kimivl_run(engine, prompt[:32], 4)
    runs: dict[str, list[tuple[float, float]]] = {name: [] for name in (*kimivl, *(f"llama_{t}" for t in LLAMA_TYPES))}
    info = ""
    for r in range(rounds):
        for name in runs:
            if name in kimivl:
                _, _, prefill_s, decode_s = kimivl_run(kimivl[name], prompt, new)
            else:  # loaded per round (from the page cache), so two models are never resident at once
                llama = LlamaCpp(files[name.removeprefix("llama_")], threads, prompt_len + new + 8, prompt_len)
                llama.generate(prompt[:32].tolist(), 4)
                _, _, prefill_s, decode_s = llama.generate(prompt.tolist(), new)
                info = info or llama.system_info()
                llama.close()
            runs[name].append((prompt_len / prefill_s, new / decode_s))
            print(f"{setting} round {r + 1}: {name:>14} prefill {runs[name][-1][0]:7.1f} tok/s  decode "
                  f"{runs[name][-1][1]:6.2f} tok/s", file=sys.stderr)  # fmt: skip
    result: dict = {"prompt_tokens": prompt_len, "new_tokens": new, "rounds": rounds}
    for name, values in runs.items():
        result[name] = {
            "prefill_tok_s": round(statistics.median(v[0] for v in values), 1),
            "decode_tok_s": round(statistics.median(v[1] for v in values), 2),
            "prefill_all": [round(v[0], 1) for v in values],
            "decode_all": [round(v[1], 2) for v in values],
        }
    for ours, theirs in PAIRS.items():
        for phase in ("prefill", "decode"):
            ratio = result[ours][f"{phase}_tok_s"] / result[theirs][f"{phase}_tok_s"]
            result[f"{ours}_vs_{theirs}_{phase}"] = round(ratio, 2)
    result["llama_system_info"] = info
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--setting", choices=[*SETTINGS, "both"], default="both")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    try:
        import gguf  # noqa: F401
        import llama_cpp  # noqa: F401
    except ImportError as exc:
        print(f"cpu_vs_llamacpp: {exc.name} is missing: pip install gguf llama-cpp-python", file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    folder = cached_checkpoint("mid", dtype="bf16")
    files = gguf_files(folder, args.threads)
    report: dict = {
        "model": folder.name,
        "threads": args.threads,
        "cpu_flags": sorted(f for f in cpu.features() if f.startswith(("avx", "amx", "fma", "asimd", "sve"))),
        "kimivl_cpu_plan": cpu.plan().why,
        "llama_repack": False,
        "q4_k_m_recipe": recipe_check(folder, files["Q4_K_M"]),
        "faithfulness": faithfulness(folder, files, args.threads),
    }
    for setting in SETTINGS if args.setting == "both" else (args.setting,):
        report[setting] = speed(folder, files, setting, args.rounds, args.threads)
    report["elapsed_s"] = round(time.perf_counter() - t0, 1)
    print(json.dumps(report, indent=None if args.json else 1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
