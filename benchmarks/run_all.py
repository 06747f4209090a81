"""Run every CPU benchmark (`make bench`) and print one JSON object: benchmark name -> its JSON.

Each benchmark runs in its own process (peak RSS and thread settings stay its own) with `--json`,
plus `--quick` where it has one unless `--full` is given. A benchmark that fails is reported
with its exit code and last stderr line, and the others still run; the exit code is 1 then.
The GPU script (`benchmarks/gpu/run.sh`) is not run here: it needs a lent GPU.

    .venv/bin/python benchmarks/run_all.py [--full] [--only NAME ...] [-o results.json]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent

# name -> (script, arguments besides --json, has --quick)
BENCHMARKS: dict[str, tuple[str, list[str], bool]] = {
    "shots": ("shots.py", ["--repeat", "1"], False),
    "moe": ("moe.py", [], True),
    "engine_cpu": ("engine_cpu.py", [], True),
    "load_rss": ("load_rss.py", [], False),
    "fullsize_cpu": ("fullsize_cpu.py", [], False),
    "ocr_bench": ("ocr_bench.py", [], False),
    "grammar_overhead": ("grammar_overhead.py", [], True),
}


def run_one(script: str, extra: list[str]) -> dict:
    start = time.perf_counter()
    result = subprocess.run(
        [sys.executable, str(HERE / script), "--json", *extra], capture_output=True, text=True, check=False
    )
    seconds = round(time.perf_counter() - start, 1)
    if result.returncode != 0:
        last = (result.stderr.strip().splitlines() or ["(no output)"])[-1]
        return {"error": f"exit {result.returncode}: {last}", "wall_s": seconds}
    try:
        data = json.loads(result.stdout)
    except json.JSONDecodeError:
        return {"error": "its stdout is not one JSON document", "wall_s": seconds}
    return {**data, "wall_s": seconds} if isinstance(data, dict) else {"result": data, "wall_s": seconds}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--full", action="store_true", help="full-size runs instead of --quick ones")
    parser.add_argument("--only", nargs="+", choices=sorted(BENCHMARKS), help="run just these")
    parser.add_argument("-o", "--output", type=Path, help="also write the JSON object to this file")
    args = parser.parse_args()
    results = {}
    for name in args.only or BENCHMARKS:
        script, extra, has_quick = BENCHMARKS[name]
        print(f"running {name} ...", file=sys.stderr, flush=True)
        results[name] = run_one(script, extra + (["--quick"] if has_quick and not args.full else []))
    text = json.dumps(results, indent=2)
    print(text)
    if args.output:
        args.output.write_text(text + "\n", encoding="utf-8")
    return 1 if any("error" in r for r in results.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
