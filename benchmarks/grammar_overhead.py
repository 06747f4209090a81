"""Grammar-constrained decoding: what the JSON constraint costs per token, against a decode step.

Two measurements in one run, on the generated *mid* checkpoint (1.1B, the real routing shape,
32K vocabulary; `python -m kimivl_cli.testing.checkpoint` builds it, cached):

1. libraries: xgrammar and llguidance (when installed) over the mid tokenizer, a schema with an
   integer, a string and an array, random logits: the time to compute the next-token mask and
   apply it, per token (mean, median, p99), rounds interleaved.
2. engine: kimivl's `JsonGuide` inside real generations (greedy off, seeded): the seconds spent
   in the guide (mask, accept, closing search) per token, against the decode step it rides on,
   in wall time and in CPU time (the latter less disturbed by other processes on the machine).
   The target: under 10% of a decode step.

    .venv/bin/python benchmarks/grammar_overhead.py [--json] [--quick] [--quant none|nf4]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch

SCHEMA = {
    "type": "object",
    "properties": {
        "count": {"type": "integer"},
        "label": {"type": "string"},
        "tags": {"type": "array", "items": {"type": "string"}},
    },
    "required": ["count", "label", "tags"],
}


def _summary(seconds: list[float]) -> dict:
    ordered = sorted(seconds)
    return {
        "tokens": len(seconds),
        "mean_us": round(statistics.mean(seconds) * 1e6, 1),
        "median_us": round(statistics.median(seconds) * 1e6, 1),
        "p99_us": round(ordered[int(len(ordered) * 0.99)] * 1e6, 1),
    }


def library_loops(tokenizer, vocab_size: int, rounds: int, steps: int) -> dict:
    """Per-token mask cost of each library on the same random logits, rounds interleaved."""
    import xgrammar as xgr

    stops = [tokenizer.im_end_id, tokenizer.eos_id]
    n = tokenizer.vocab_size  # llguidance wants the whole tokenizer; logits are padded to it
    vocab = [b"" if tokenizer.is_special(i) else tokenizer.token_bytes(i) for i in range(n)]
    info = xgr.TokenizerInfo(vocab, xgr.VocabType.RAW, vocab_size=n, stop_token_ids=stops)
    compiled = xgr.GrammarCompiler(info, max_threads=1).compile_json_schema(json.dumps(SCHEMA), any_whitespace=False)

    def xgrammar_step(matcher, bitmask, logits):
        matcher.fill_next_token_bitmask(bitmask)
        xgr.apply_token_bitmask_inplace(logits, bitmask)
        return int(logits.argmax())

    makers = {"xgrammar": (lambda: xgr.GrammarMatcher(compiled), xgrammar_step, lambda m, t: m.accept_token(t))}
    try:
        import llguidance
        import llguidance.torch as llt
        from llguidance.tiktoken import lltokenizer_from_encoding

        lltok = lltokenizer_from_encoding(tokenizer._encoding, n_vocab=n, eos_token=stops)
        grammar = llguidance.LLMatcher.grammar_from_json_schema(
            json.dumps(SCHEMA), defaults={"whitespace_flexible": False}
        )

        def llguidance_step(matcher, bitmask, logits):
            llt.fill_next_token_bitmask(matcher, bitmask, 0)
            llt.apply_token_bitmask_inplace(logits, bitmask)
            return int(logits.argmax())

        makers["llguidance"] = (
            lambda: llguidance.LLMatcher(lltok, grammar),
            llguidance_step,
            lambda m, t: m.consume_token(t),
        )
    except ImportError:
        pass
    times: dict[str, list[float]] = {name: [] for name in makers}
    for r in range(rounds):
        for name, (make, step, accept) in makers.items():
            generator = torch.Generator().manual_seed(r)
            matcher, bitmask = make(), xgr.allocate_token_bitmask(1, n)
            for _ in range(steps):
                logits = torch.randn(1, n, generator=generator)
                start = time.perf_counter()
                token = step(matcher, bitmask, logits)
                accept(matcher, token)
                times[name].append(time.perf_counter() - start)
                if token in stops:
                    break
    return {name: _summary(seconds) for name, seconds in times.items()}


def engine_runs(engine, rounds: int, max_tokens: int) -> dict:
    """Constrained generations with the guide's methods timed: guide seconds per token vs the step."""
    from kimivl_cli.backends import collect
    from kimivl_cli.engine import grammar
    from kimivl_cli.engine.events import JsonFormat

    spent = [0.0, 0.0]  # wall seconds, this thread's CPU seconds

    def timed(method):
        def run(*args, **kwargs):
            start, cpu = time.perf_counter(), time.thread_time()
            try:
                return method(*args, **kwargs)
            finally:
                spent[0] += time.perf_counter() - start
                spent[1] += time.thread_time() - cpu

        return run

    for name in ("mask_", "accept", "closing"):
        setattr(grammar.JsonGuide, name, timed(getattr(grammar.JsonGuide, name)))
    messages = [{"role": "user", "content": "Describe the picture as JSON."}]
    per_round = []
    for seed in range(rounds):
        spent[:] = [0.0, 0.0]
        params = engine.defaults.with_overrides(seed=seed, max_new_tokens=max_tokens, temperature=1.0)
        cpu = time.process_time()
        reply = collect(engine.generate(messages, [], params, json_format=JsonFormat(SCHEMA)))
        cpu = time.process_time() - cpu
        json.loads(reply.answer)  # it must parse
        tokens = reply.done.usage.completion_tokens
        step_s = (reply.done.timings.decode_s - spent[0]) / tokens
        per_round.append(
            {
                "tokens": tokens,
                "guide_ms": round(spent[0] * 1e3 / tokens, 3),
                "step_ms": round(step_s * 1e3, 2),
                "guide_cpu_ms": round(spent[1] * 1e3 / tokens, 3),
                "step_cpu_ms": round((cpu - spent[1]) * 1e3 / tokens, 2),  # all threads, prefill included
            }
        )
    median = {key: statistics.median(r[key] for r in per_round) for key in per_round[0]}
    return {
        "rounds": per_round,
        "guide_ms_per_token": median["guide_ms"],
        "decode_step_ms": median["step_ms"],
        "overhead_share": round(median["guide_ms"] / median["step_ms"], 4),
        "cpu_share": round(median["guide_cpu_ms"] / median["step_cpu_ms"], 4),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--quick", action="store_true", help="fewer rounds and tokens")
    parser.add_argument("--quant", default="none", choices=["none", "nf4"], help="mid checkpoint weights")
    args = parser.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", os.cpu_count() or 1)))

    from kimivl_cli.cli import quiet_libraries
    from kimivl_cli.engine.engine import Engine
    from kimivl_cli.testing.checkpoint import cached_checkpoint

    quiet_libraries()  # bitsandbytes logs on import on some CPUs; stdout must stay one JSON document

    folder = cached_checkpoint("mid", dtype="bf16")
    engine = Engine.load(folder, dtype=torch.bfloat16, device="cpu", quant=args.quant)
    rounds, steps = (2, 100) if args.quick else (5, 300)
    result = {
        "checkpoint": "mid (1.1B, vocab 32768)",
        "quant": args.quant,
        "threads": torch.get_num_threads(),
        "cpu_flags": _cpu_flags(),
        "libraries": library_loops(engine.tokenizer, engine.config.text.vocab_size, rounds, steps),
        "engine": engine_runs(engine, rounds, 48 if args.quick else 96),
    }
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        for name, figures in result["libraries"].items():
            print(f"{name}: mask {figures['mean_us']} us/token mean, {figures['p99_us']} us p99")
        e = result["engine"]
        print(
            f"engine: guide {e['guide_ms_per_token']} ms/token vs decode step {e['decode_step_ms']} ms "
            f"({100 * e['overhead_share']:.1f}%)"
        )
    return 0


def _cpu_flags() -> list[str]:
    try:
        with open("/proc/cpuinfo", encoding="ascii") as info:
            flags = next(line for line in info if line.startswith("flags")).split(":", 1)[1].split()
    except (OSError, StopIteration):
        return []
    return sorted(f for f in flags if f in ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16", "amx_tile"))


if __name__ == "__main__":
    sys.exit(main())
