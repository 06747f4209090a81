"""A performance model of batch-1 decode on a GPU, checked without one.

Traces one full-size decode step as the engine replays it from a CUDA graph (fake CUDA tensors,
`testing/gpu_trace.py`: nothing runs, every CUDA branch is taken), then prices it: per kernel, the
launches and the bytes it moves (traffic models: `testing/decode_bytes.py` for the fused decode
kernels, `gpu_trace.aten_bytes` for torch ops), and in total

    time per token = bytes / bandwidth + launches x launch cost

(defaults: an H200, 4.8 TB/s, ~3 us per launch replayed from a graph). Beside it, the floor: every
weight a token uses read once (NF4 codes and absmax, or bf16), the bf16 lm_head, the fp32 routers,
and the cache rows in use. The model ignores compute; a kernel that cannot keep up with memory (see
the SASS instruction counts of tests/gpu's AOT report) is what a measured run shows on top.

    python benchmarks/gpu_model.py                       # NF4 and bf16, fused and module paths
    python benchmarks/gpu_model.py --quant nf4 --position 16384 --json
    python benchmarks/gpu_model.py --bandwidth 1.0e12 --launch-us 3   # an RTX 4090
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from typing import Any

from kimivl_cli.model.config import TextConfig
from kimivl_cli.testing.gpu_trace import decode_trace
from kimivl_cli.weight_formats import BLOCKSIZE

H200_BANDWIDTH = 4.8e12  # bytes/s
GRAPH_LAUNCH_US = 3.0
NF4_BYTES_PER_WEIGHT = 0.5 + 4 / BLOCKSIZE  # a 4-bit code plus a share of the fp32 absmax


@dataclass(frozen=True)
class Hardware:
    bandwidth: float = H200_BANDWIDTH
    launch_us: float = GRAPH_LAUNCH_US


def floor_bytes(cfg: TextConfig, quant: str, slots: int) -> dict[str, int]:
    """What a decode token must read at least: each weight it uses once, plus the cache rows in use."""
    per_weight = NF4_BYTES_PER_WEIGHT if quant == "nf4" else 2
    d, heads = cfg.hidden_size, cfg.num_attention_heads
    attention = (
        d * heads * cfg.qk_head_dim
        + d * (cfg.kv_lora_rank + cfg.qk_rope_head_dim)
        + cfg.kv_lora_rank * heads * (cfg.qk_nope_head_dim + cfg.v_head_dim)
        + heads * cfg.v_head_dim * d
    )
    moe_layers = sum(cfg.is_moe_layer(i) for i in range(cfg.num_hidden_layers))
    dense_layers = cfg.num_hidden_layers - moe_layers
    active_experts = cfg.num_experts_per_tok + cfg.n_shared_experts
    mlp = dense_layers * 3 * d * cfg.intermediate_size + moe_layers * active_experts * 3 * d * cfg.moe_intermediate_size
    linears = cfg.num_hidden_layers * attention + mlp
    return {
        "weights": int(linears * per_weight),
        "lm_head": cfg.vocab_size * d * 2,
        "routers": moe_layers * cfg.n_routed_experts * (d + 1) * 4,
        "cache": cfg.num_hidden_layers * slots * cfg.cache_width * 2,
    }


def model_step(quant: str, position: int, max_new: int, fused: bool, hw: Hardware) -> dict[str, Any]:
    """One traced decode step priced at `hw`: per kernel and in total, with the floor beside it."""
    trace = decode_trace(quant, position, max_new, fused=fused)
    summary = trace.summary()
    per_kernel = {
        name: {**row, "us": round(row["bytes"] / hw.bandwidth * 1e6 + row["launches"] * hw.launch_us, 2)}
        for name, row in summary["per_kernel"].items()
    }
    memory_s = summary["bytes"] / hw.bandwidth
    launch_s = summary["launches"] * hw.launch_us * 1e-6
    floor = floor_bytes(TextConfig(), quant, position + 1)
    return {
        "quant": "bf16" if quant == "none" else quant,
        "path": "fused" if fused else "module",
        "position": position,
        "launches": summary["launches"],
        "copies": summary["copies"],
        "syncs": summary["syncs"],
        "bytes": summary["bytes"],
        "floor_bytes": sum(floor.values()),
        "floor": floor,
        "bytes_over_floor": round(summary["bytes"] / sum(floor.values()), 4),
        "memory_us": round(memory_s * 1e6, 1),
        "launch_us": round(launch_s * 1e6, 1),
        "tokens_per_s": round(1 / (memory_s + launch_s), 1),
        "roofline_tokens_per_s": round(hw.bandwidth / sum(floor.values()), 1),
        "per_kernel": per_kernel,
    }


def _print(result: dict[str, Any], top: int) -> None:
    r = result
    print(
        f"{r['quant']:>4} {r['path']:>6} @ {r['position']}: {r['launches']} launches, {r['bytes'] / 1e9:.3f} GB "
        f"({r['bytes_over_floor']:.3f} x the {r['floor_bytes'] / 1e9:.3f} GB floor), {r['copies']} copies, "
        f"{r['syncs']} syncs -> {r['memory_us']:.0f} us memory + {r['launch_us']:.0f} us launches = "
        f"{r['tokens_per_s']:.0f} tok/s (roofline {r['roofline_tokens_per_s']:.0f})"
    )
    rows = sorted(r["per_kernel"].items(), key=lambda kv: -kv[1]["us"])[:top]
    for name, row in rows:
        print(f"    {name:<34} {row['launches']:>5} launches {row['bytes'] / 1e6:>9.1f} MB {row['us']:>8.1f} us")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quant", choices=("nf4", "bf16", "both"), default="both")
    parser.add_argument("--path", choices=("fused", "module", "both"), default="both")
    parser.add_argument("--position", type=int, default=1024, help="tokens before the decoded one (default 1024)")
    parser.add_argument("--max-new", type=int, default=32768, help="the request's max_new_tokens (cache size)")
    parser.add_argument("--bandwidth", type=float, default=H200_BANDWIDTH, help="bytes/s (default H200: 4.8e12)")
    parser.add_argument("--launch-us", type=float, default=GRAPH_LAUNCH_US, help="us per launch in a graph")
    parser.add_argument("--top", type=int, default=8, help="kernels listed per step")
    parser.add_argument("--json", action="store_true", help="one JSON object on stdout")
    args = parser.parse_args(argv)
    hw = Hardware(args.bandwidth, args.launch_us)
    quants = ("nf4", "none") if args.quant == "both" else ("nf4" if args.quant == "nf4" else "none",)
    paths = (True, False) if args.path == "both" else (args.path == "fused",)
    results = [model_step(q, args.position, args.max_new, fused, hw) for q in quants for fused in paths]
    if args.json:
        print(json.dumps({"hardware": hw.__dict__, "steps": results}, indent=1))
    else:
        for result in results:
            _print(result, args.top)
    return 0


if __name__ == "__main__":
    sys.exit(main())
