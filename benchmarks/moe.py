"""One Kimi-VL MoE layer at real size on CPU: naive bf16 per-expert loop vs our NF4 CPU path.

64 routed experts (2048 -> 1408 -> 2048), top-6, 2 shared experts (intermediate 2816),
random weights. Times the routed + shared experts for 1 and 512 tokens (median of runs, each
starting with the weights out of the cache unless `--warm`), and compares weight memory.
Errors, as norm(diff) / norm(ref): against the bf16 loop (`rel_err_*`: mostly NF4 itself) and,
for 1 token, against the exact fp32 NF4 result (`rel_err_vs_exact_nf4_1tok`: what the int8
activations of the decode kernels cost). `--json` prints one JSON object; `--quick` uses fewer
runs and 128 instead of 512 tokens.

    .venv/bin/python benchmarks/moe.py [--json] [--quick] [--warm]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
import torch.nn.functional as F

from kimivl_cli.kernels.moe_cpu import moe_cpu
from kimivl_cli.kernels.reference import fused_moe_reference
from kimivl_cli.kernels.routing import RoutingConfig, route
from kimivl_cli.quant.modules import NF4Linear
from kimivl_cli.testing.nf4_twins import stacked_nf4_experts
from kimivl_cli.weight_formats import NF4Tensor, dequantize_nf4

E, H, INTER, TOP_K, SHARED = 64, 2048, 1408, 6, 2


# Written before each timed run, untimed: larger than any last-level cache here (32 MB), so every
# run reads its weights from memory, as in a real decode step, where the other layers' weights pass
# through the cache in between. Without it one token's NF4 working set (~20 MB) stays cached from
# run to run while the bf16 one (~70 MB) cannot, which flatters the NF4 path.
_EVICT = torch.zeros(128 * 2**20 // 4)


def _median_ms(fn, runs: int, evict: bool) -> float:
    fn()  # warm-up
    times = []
    for _ in range(runs):
        if evict:
            _EVICT.add_(1)
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def _print_table(result: dict, sizes: dict[str, int]) -> None:
    for label, tokens in sizes.items():
        print(
            f"{tokens:4d} tokens: naive bf16 loop {result[f'naive_bf16_ms_{label}']:8.2f} ms | "
            f"NF4 CPU path {result[f'nf4_cpu_ms_{label}']:8.2f} ms | speedup x{result[f'speedup_{label}']} | "
            f"rel. error vs bf16 {result[f'rel_err_{label}']}"
        )
    print(f"1 token vs exact fp32 NF4 (int8 activations): rel. error {result['rel_err_vs_exact_nf4_1tok']}")
    print(
        f"weights: bf16 {result['bf16_weight_mb']} MB, NF4 {result['nf4_weight_mb']} MB "
        f"(x{result['memory_ratio']} smaller); {result['threads']} threads"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--warm", action="store_true", help="leave the weights in the cache between runs")
    args = parser.parse_args()
    torch.manual_seed(0)
    bf16 = torch.bfloat16

    def weight(*shape: int) -> torch.Tensor:
        return (torch.randn(*shape) * 0.02).to(bf16)

    gate, up, down = weight(E, INTER, H), weight(E, INTER, H), weight(E, H, INTER)
    shared = [weight(INTER * SHARED, H), weight(INTER * SHARED, H), weight(H, INTER * SHARED)]
    router, bias = weight(E, H), torch.randn(E) * 0.01
    nf4_experts = stacked_nf4_experts(gate, up, down)
    nf4_shared = [NF4Linear.from_weight(w) for w in shared]
    experts = [(nf4_experts.get_buffer(f"{p}_packed"), nf4_experts.get_buffer(f"{p}_absmax")) for p in
               nf4_experts.projections]  # fmt: skip
    cfg = RoutingConfig(top_k=TOP_K)

    def naive(x: torch.Tensor, idx: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        y = fused_moe_reference(x, idx, w, gate, up, down)
        return y + F.linear(F.silu(F.linear(x, shared[0])) * F.linear(x, shared[1]), shared[2])

    def ours(x: torch.Tensor, idx: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        y = moe_cpu(x, idx, w, *experts)
        return y + nf4_shared[2](F.silu(nf4_shared[0](x)) * nf4_shared[1](x))

    def exact_nf4(x: torch.Tensor, idx: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """fp32 with every weight replaced by its NF4 value (only the used experts dequantised)."""
        used, local = torch.unique(idx, return_inverse=True)
        dense = [dequantize_nf4(NF4Tensor(p[used], a[used], torch.float32)) for p, a in experts]
        sh = [dequantize_nf4(NF4Tensor(m.packed, m.absmax, torch.float32)) for m in nf4_shared]
        xf = x.float()
        return fused_moe_reference(xf, local, w, *dense) + F.silu(xf @ sh[0].t()) * (xf @ sh[1].t()) @ sh[2].t()

    result: dict[str, float | int | str | bool] = {"threads": torch.get_num_threads(), "warm": args.warm}
    sizes = {"1tok": 1, "512tok": 128 if args.quick else 512}
    for label, tokens in sizes.items():
        x = torch.randn(tokens, H).to(bf16)
        idx, w = route(x, router, bias, cfg)
        runs = (3 if args.quick else 10) if tokens == 1 else (1 if args.quick else 3)
        with torch.inference_mode():
            t_naive = _median_ms(lambda x=x, idx=idx, w=w: naive(x, idx, w), runs, not args.warm)
            t_ours = _median_ms(lambda x=x, idx=idx, w=w: ours(x, idx, w), runs, not args.warm)
            ref, got = naive(x, idx, w).float(), ours(x, idx, w).float()
        result[f"tokens_{label}"] = tokens
        result[f"naive_bf16_ms_{label}"] = round(t_naive, 2)
        result[f"nf4_cpu_ms_{label}"] = round(t_ours, 2)
        result[f"speedup_{label}"] = round(t_naive / t_ours, 3)
        result[f"rel_err_{label}"] = round(float((got - ref).norm() / ref.norm()), 4)
        if tokens == 1:
            exact = exact_nf4(x, idx, w)
            result["rel_err_vs_exact_nf4_1tok"] = round(float((got - exact).norm() / exact.norm()), 4)

    bf16_bytes = sum(t.nbytes for t in (gate, up, down, *shared))
    nf4_bytes = sum(b.nbytes for b in nf4_experts.buffers()) + sum(b.nbytes for m in nf4_shared for b in m.buffers())
    result.update(bf16_weight_mb=round(bf16_bytes / 2**20, 1), nf4_weight_mb=round(nf4_bytes / 2**20, 1))
    result["memory_ratio"] = round(bf16_bytes / nf4_bytes, 3)
    if args.json:
        print(json.dumps(result))
        return
    _print_table(result, sizes)


if __name__ == "__main__":
    main()
