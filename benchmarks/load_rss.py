"""Peak host memory while loading a generated sharded checkpoint, against the streaming bound.

    python benchmarks/load_rss.py [--size mid] [--shards 4] [--dtype bf16] [--json]

Writes (or reuses) a random official-format checkpoint with `kimivl_cli.testing.checkpoint`, then
loads it with `load_model` in a fresh process and compares the growth of peak RSS with
model bytes + 1.3 x the largest tensor (the loader holds the model plus about one tensor).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

_CHILD = r"""
import json, resource, sys, time, torch
from kimivl_cli.model import weights
# Warm-up: the first nn.Embedding init maps ~145 MB of torch code/tables into the process (measured;
# the same for any PyTorch program), which is not loader memory.
torch.nn.Embedding(8, 8, device="meta")
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
t0 = time.perf_counter()
model, _ = weights.load_model(sys.argv[1], dtype=getattr(torch, sys.argv[2]))
seconds = time.perf_counter() - t0
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
model_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
print(json.dumps({"baseline_rss": before, "peak_rss": peak, "model_bytes": model_bytes, "load_s": seconds}))
"""


def largest_tensor_bytes(folder: Path, dtype_size: int) -> int:
    from safetensors import safe_open

    from kimivl_cli.model.weights import checkpoint_files

    largest = 0
    for path in checkpoint_files(folder):
        with safe_open(path, framework="pt") as f:
            for key in f.keys():  # noqa: SIM118 (safe_open is not iterable)
                n = 1
                for d in f.get_slice(key).get_shape():
                    n *= d
                largest = max(largest, n * dtype_size)
    return largest


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="mid")
    parser.add_argument("--shards", type=int, default=4)
    parser.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"])
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    from kimivl_cli.testing.checkpoint import cached_checkpoint

    folder = cached_checkpoint(args.size, shards=args.shards, dtype=args.dtype)
    torch_dtype = {"bf16": "bfloat16", "fp32": "float32"}[args.dtype]
    out = subprocess.run(
        [sys.executable, "-c", _CHILD, str(folder), torch_dtype], check=True, capture_output=True, text=True
    )
    r = json.loads(out.stdout.strip().splitlines()[-1])
    r["checkpoint_bytes"] = sum(p.stat().st_size for p in folder.glob("*.safetensors"))
    r["largest_tensor_bytes"] = largest_tensor_bytes(folder, 2 if args.dtype == "bf16" else 4)
    r["growth"] = r["peak_rss"] - r["baseline_rss"]
    r["bound"] = r["model_bytes"] + 1.3 * r["largest_tensor_bytes"]
    r["ok"] = r["growth"] <= r["bound"]
    if args.json:
        print(json.dumps(r))
    else:
        gib = 1 << 30
        print(
            f"checkpoint {r['checkpoint_bytes'] / gib:.2f} GiB in {args.shards} shards, model {r['model_bytes'] / gib:.2f} GiB, "
            f"largest tensor {r['largest_tensor_bytes'] / gib:.3f} GiB\n"
            f"peak RSS growth {r['growth'] / gib:.2f} GiB vs bound {r['bound'] / gib:.2f} GiB "
            f"(model + 1.3 x largest): {'OK' if r['ok'] else 'OVER'}; load {r['load_s']:.1f} s"
        )
    return 0 if r["ok"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
