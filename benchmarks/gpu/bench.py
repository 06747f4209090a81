"""GPU benchmark for a lent machine (through run.sh): our kernels and the full-size model through the Engine.

Writes one JSON object to --out (default $OUT/gpu_bench.json, else ./gpu_bench.json) after every
section, so a run cut short keeps what it measured. A section that fails records its error under
"errors" and the next one runs. Sections (see `Setup.full` for the sizes):

- env: device, compute capability, memory, versions.
- moe: one real-size MoE layer (64 experts, 2048 -> 1408, top-6) at 1, 16, 512 and 1,024 tokens:
  Triton fused NF4 vs Triton fused bf16 vs a per-expert bf16 loop (the reference) vs
  `torch._grouped_mm` (bf16); relative errors; the decode call replayed from a CUDA graph.
- dense: batch-1 NF4 GEMV (`nf4_matmul`) at every Kimi-VL linear shape, achieved GB/s, vs bf16 `F.linear`.
- decode_kernels: the fused decode step's kernels (kernels/gemv.py, moe_decode.py, mla_decode.py) at
  Kimi-VL's shapes, NF4 and bf16 weights, each replayed from a CUDA graph: achieved GB/s (bytes from
  `testing/decode_bytes.py`) and relative error against its PyTorch reference, beside bf16 `F.linear`,
  `torch._grouped_mm` and a plain bf16 attention over the same slots.
- model_nf4, model_bf16: the full-size model with random weights through the real `Engine`:
  graph-replay decode at 1K and 16K context (the fused decode kernels; the module path at 1K beside
  them), prefill at 512 / 1,024 / 4,096 tokens, the vision tower
  on a 1024 x 1024 image, peak VRAM, CUDA kernels per decode step (profiler).
- traced: launches, bytes, copies and syncs of one decode step traced on fake tensors (no GPU needed).

Imports only what the bare CUDA image has (torch, triton, numpy, pillow): no bitsandbytes, no PyMuPDF.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import sys
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from kimivl_cli.engine.engine import Engine
from kimivl_cli.engine.sampling import SamplingParams
from kimivl_cli.kernels import gemv as gemv_kernels
from kimivl_cli.kernels import mla_decode, moe_decode
from kimivl_cli.kernels.moe_triton import fused_moe, nf4_matmul
from kimivl_cli.kernels.reference import fused_moe_reference
from kimivl_cli.kernels.routing import RoutingConfig
from kimivl_cli.model.cache import LatentCache
from kimivl_cli.model.config import KimiVLConfig
from kimivl_cli.model.kimivl import KimiVL
from kimivl_cli.model.weights import materialize
from kimivl_cli.processor.image import process_images
from kimivl_cli.quant.modules import quantize_linears_
from kimivl_cli.testing.gpu_trace import CudaTrace, decode_trace
from kimivl_cli.weight_formats import NF4Tensor, dequantize_nf4

# Kimi-VL's NF4 linears (N, K) at batch 1: attention, the dense first layer, shared and routed experts.
KIMIVL_LINEARS = {
    "q_proj": (3072, 2048),
    "kv_a_proj_with_mqa": (576, 2048),
    "kv_b_proj": (4096, 512),
    "o_proj": (2048, 2048),
    "dense_gate_up": (11264, 2048),
    "dense_down": (2048, 11264),
    "shared_gate_up": (2816, 2048),
    "shared_down": (2048, 2816),
    "expert_gate_up": (1408, 2048),
    "expert_down": (2048, 1408),
}


@dataclass
class Setup:
    """What to measure and at which sizes."""

    device: str
    moe_shape: tuple[int, int, int, int] = (64, 2048, 1408, 6)  # experts, hidden, inter, top-k
    moe_tokens: tuple[int, ...] = (1, 16, 512, 1024)
    dense_shapes: dict[str, tuple[int, int]] = field(default_factory=lambda: dict(KIMIVL_LINEARS))
    config: KimiVLConfig = field(default_factory=KimiVLConfig)
    quants: tuple[str, ...] = ("nf4", "none")
    decode_contexts: tuple[int, ...] = (1024, 16384)
    attention_slots: tuple[int, ...] = (1024, 16384)
    decode_tokens: int = 64
    prefill_lengths: tuple[int, ...] = (512, 1024, 4096)
    image_size: int = 1024
    runs: int = 20

    @classmethod
    def full(cls, quick: bool = False) -> Setup:
        if quick:
            return cls("cuda", moe_tokens=(1, 512), quants=("nf4",), decode_contexts=(1024,), decode_tokens=32,
                       prefill_lengths=(1024,), image_size=0, runs=10)  # fmt: skip
        return cls("cuda")


class Report:
    """The JSON result, rewritten (atomically) after every section."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.data: dict[str, Any] = {"errors": {}, "section_seconds": {}}
        self.started = time.monotonic()

    def write(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text(json.dumps(self.data, indent=1) + "\n")
        tmp.replace(self.path)

    @contextlib.contextmanager
    def section(self, name: str) -> Iterator[dict[str, Any]]:
        out: dict[str, Any] = {}
        t0 = time.monotonic()
        try:
            yield out
        except Exception as exc:  # one broken section must not hide the others' numbers
            self.data["errors"][name] = f"{type(exc).__name__}: {exc}\n{traceback.format_exc()[-2000:]}"
        finally:
            self.data[name] = out
            self.data["section_seconds"][name] = round(time.monotonic() - t0, 1)
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            self.write()


def timed_ms(fn: Callable[[], object], device: str, runs: int, warmup: int = 2) -> float:
    """Mean milliseconds per call (CUDA events on a GPU)."""
    for _ in range(warmup):
        fn()
    if device == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()
        start.record()
        for _ in range(runs):
            fn()
        end.record()
        torch.cuda.synchronize()
        return round(start.elapsed_time(end) / runs, 4)
    t0 = time.perf_counter()
    for _ in range(runs):
        fn()
    return round((time.perf_counter() - t0) * 1e3 / runs, 4)


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _sig(x: float) -> float:
    """Four significant digits (GB figures of the small CPU-test sizes would round to 0)."""
    return float(f"{x:.4g}")


def _rel(got: torch.Tensor, ref: torch.Tensor) -> float:
    return float((got.float() - ref.float()).norm() / ref.float().norm())


def random_nf4(shape: tuple[int, ...], device: str, gen: torch.Generator) -> NF4Tensor:
    """Random codes with absmax ~2.5 sigma of N(0, 1/fan_in), made on the device."""
    packed = torch.randint(0, 256, (*shape[:-1], shape[-1] // 2), dtype=torch.uint8, device=device, generator=gen)
    absmax = torch.full((*shape[:-1], shape[-1] // 64), 2.5 / math.sqrt(shape[-1]), device=device)
    return NF4Tensor(packed, absmax, torch.bfloat16)


def _grouped_mm_moe(x, idx, weights, gate, up, down) -> torch.Tensor:
    """The MoE with `torch._grouped_mm` (bf16): sort pairs by expert, three grouped GEMMs, scatter-add."""
    k = idx.shape[1]
    flat = idx.reshape(-1)
    order = flat.argsort()
    offs = torch.bincount(flat, minlength=gate.shape[0]).cumsum(0).int()
    xs = x[order // k]
    h = F.silu(torch._grouped_mm(xs, gate.transpose(1, 2), offs=offs)) * torch._grouped_mm(
        xs, up.transpose(1, 2), offs=offs
    )
    y = torch._grouped_mm(h, down.transpose(1, 2), offs=offs).float() * weights.reshape(-1)[order, None]
    return torch.zeros(x.shape[0], x.shape[1], device=x.device).index_add_(0, order // k, y).to(x.dtype)


def _attempt(out: dict[str, Any], key: str, fn: Callable[[], Any]) -> None:
    """out[key] = fn(), or the error under out["errors"][key]: one failing variant keeps the rest."""
    try:
        out[key] = fn()
    except Exception as exc:
        out.setdefault("errors", {})[key] = f"{type(exc).__name__}: {str(exc)[-600:]}"


def bench_env(out: dict[str, Any], setup: Setup) -> None:
    import triton

    out.update(torch=torch.__version__, triton=triton.__version__, device=setup.device)
    if setup.device == "cuda":
        props = torch.cuda.get_device_properties(0)
        out.update(name=props.name, capability=f"{props.major}.{props.minor}", memory_gb=round(props.total_memory / 1e9, 1),
                   sms=props.multi_processor_count)  # fmt: skip


def bench_moe(out: dict[str, Any], setup: Setup) -> None:
    dev = setup.device
    e, h, i, k = setup.moe_shape
    gen = torch.Generator(dev).manual_seed(0)
    nf4 = [random_nf4(s, dev, gen) for s in ((e, i, h), (e, i, h), (e, h, i))]
    packed = [(t.packed, t.absmax) for t in nf4]
    bf16 = [dequantize_nf4(t, torch.bfloat16) for t in nf4]
    for t in setup.moe_tokens:
        x = torch.randn(t, h, device=dev, generator=gen).bfloat16()
        idx = torch.rand(t, e, device=dev, generator=gen).topk(k, dim=-1).indices
        w = torch.rand(t, k, device=dev, generator=gen)
        row: dict[str, Any] = {}
        with torch.inference_mode():
            ref = fused_moe_reference(x, idx, w, *bf16)
            variants = {
                "triton_nf4": lambda x=x, idx=idx, w=w: fused_moe(x, idx, w, *packed),
                "triton_bf16": lambda x=x, idx=idx, w=w: fused_moe(x, idx, w, *bf16),
                "grouped_mm_bf16": lambda x=x, idx=idx, w=w: _grouped_mm_moe(x, idx, w, *bf16),
                "loop_bf16": lambda x=x, idx=idx, w=w: fused_moe_reference(x, idx, w, *bf16),
            }
            for name, fn in variants.items():
                _attempt(row, f"{name}_rel_err", lambda fn=fn, ref=ref: round(_rel(fn(), ref), 5))
                _attempt(row, f"{name}_ms", lambda fn=fn: timed_ms(fn, dev, setup.runs))
        out[f"{t}_tokens"] = row
    if dev == "cuda":
        _attempt(out, "cuda_graph_decode", lambda: _moe_graph(packed, bf16, h, k, e, setup))


def _moe_graph(packed, bf16, h: int, k: int, e: int, setup: Setup) -> dict[str, Any]:
    """The one-token call captured in a CUDA graph (no host sync may hide in it) and replayed."""
    x = torch.randn(1, h, device="cuda", dtype=torch.bfloat16)
    idx, w = torch.randperm(e, device="cuda")[:k].view(1, k), torch.rand(1, k, device="cuda")
    result = {}
    for name, weights in (("nf4", packed), ("bf16", bf16)):
        eager = fused_moe(x, idx, w, *weights)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            y = fused_moe(x, idx, w, *weights)
        graph.replay()
        torch.cuda.synchronize()
        result[f"{name}_equal"] = bool(torch.equal(y, eager))
        result[f"{name}_replay_ms"] = timed_ms(graph.replay, "cuda", setup.runs * 5)
    return result


def bench_dense(out: dict[str, Any], setup: Setup) -> None:
    dev = setup.device
    gen = torch.Generator(dev).manual_seed(1)
    for name, (n, kd) in setup.dense_shapes.items():
        q = random_nf4((n, kd), dev, gen)
        w = dequantize_nf4(q, torch.bfloat16)
        x = torch.randn(1, kd, device=dev, generator=gen).bfloat16()
        with torch.inference_mode():
            nf4_us = timed_ms(lambda q=q, x=x: nf4_matmul(x, q.packed, q.absmax), dev, setup.runs * 5) * 1e3
            bf16_us = timed_ms(lambda w=w, x=x: F.linear(x, w), dev, setup.runs * 5) * 1e3
            err = _rel(nf4_matmul(x, q.packed, q.absmax), F.linear(x.float(), w.float()))
        nf4_bytes, bf16_bytes = q.packed.nbytes + q.absmax.nbytes, w.nbytes
        out[name] = {"shape": [n, kd], "nf4_us": round(nf4_us, 2), "nf4_gb_s": _sig(nf4_bytes / nf4_us / 1e3),
                     "bf16_us": round(bf16_us, 2), "bf16_gb_s": _sig(bf16_bytes / bf16_us / 1e3),
                     "nf4_rel_err": round(err, 5)}  # fmt: skip


def graph_ms(fn: Callable[[], object], device: str, runs: int) -> float:
    """Milliseconds per call replayed from a CUDA graph (no Python or launch overhead in the figure)."""
    if device != "cuda":
        return timed_ms(fn, device, runs)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()  # warm-up off the capture: kernel builds, allocator
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return timed_ms(graph.replay, device, runs)


def traced_bytes(fn: Callable[[], object], slots: int | None = None) -> int:
    """Bytes the traffic models give the Triton launches of `fn` (run on fake tensors: nothing executes)."""
    with CudaTrace(slots=slots) as trace:
        fn()
    return sum(e.bytes for e in trace.events if e.kernel.startswith("triton."))


def bench_decode_kernels(out: dict[str, Any], setup: Setup) -> None:
    """Each fused decode kernel at Kimi-VL's decode shapes (see the module doc)."""
    gen = torch.Generator(setup.device).manual_seed(2)
    for fmt in ("nf4", "bf16"):
        maker = _Weights(setup, fmt, gen)
        _bench_gemvs(out, setup, maker)
        _bench_moe_decode(out, setup, maker)
        for slots in setup.attention_slots:
            _bench_mla_decode(out, setup, maker, slots)
    text, dev = setup.config.text, setup.device
    x = torch.randn(1, text.hidden_size, device=dev, generator=gen).bfloat16()
    norm = (torch.ones(text.hidden_size, device=dev, dtype=torch.bfloat16), text.rms_norm_eps)
    lm_head = torch.randn(text.vocab_size, text.hidden_size, device=dev, generator=gen).bfloat16()

    def run():
        return gemv_kernels.gemv(x, lm_head, norm=norm, out_dtype=torch.float32)

    out["bf16_lm_head"] = _kernel_row(
        setup, run, lambda: gemv_kernels.gemv_reference(x, lm_head, norm=norm, out_dtype=torch.float32),
        lambda: F.linear(x, lm_head).float(), lm_head.nbytes, runs=setup.runs,
    )  # fmt: skip


class _Weights:
    """Random weights of one format on the device, and their bf16 copies for the baselines."""

    def __init__(self, setup: Setup, fmt: str, gen: torch.Generator) -> None:
        self.setup, self.fmt, self.gen = setup, fmt, gen

    def __call__(self, *shape: int) -> gemv_kernels.Weight:
        q = random_nf4(shape, self.setup.device, self.gen)
        return (q.packed, q.absmax) if self.fmt == "nf4" else dequantize_nf4(q, torch.bfloat16)

    @staticmethod
    def bf16(w: gemv_kernels.Weight) -> torch.Tensor:
        return gemv_kernels.dense(w, torch.bfloat16) if isinstance(w, tuple) else w

    def act(self, n: int) -> torch.Tensor:
        return torch.randn(1, n, device=self.setup.device, generator=self.gen).bfloat16()


def _kernel_row(setup: Setup, run, ref, baseline, baseline_bytes: int, slots: int | None = None,
                runs: int | None = None) -> dict[str, Any]:  # fmt: skip
    """Relative error vs the reference, time and GB/s replayed from a CUDA graph, the baseline beside it.
    Off a GPU (the interpreter: correctness only) the kernel runs once and that run is the time."""
    row: dict[str, Any] = {}
    with torch.inference_mode():
        t0 = time.perf_counter()
        _attempt(row, "rel_err", lambda: round(_rel(run(), ref()), 5))
        if setup.device == "cuda":
            _attempt(row, "us", lambda: round(graph_ms(run, setup.device, runs or setup.runs * 5) * 1e3, 2))
        else:
            row["us"] = round((time.perf_counter() - t0) * 1e6, 2)
        _attempt(row, "bytes", lambda: traced_bytes(run, slots))
        if "us" in row and "bytes" in row:
            row["gb_s"] = _sig(row["bytes"] / row["us"] / 1e3)
        _attempt(row, "baseline_us", lambda: round(graph_ms(baseline, setup.device, runs or setup.runs) * 1e3, 2))
        if "baseline_us" in row:
            row["baseline_gb_s"] = _sig(baseline_bytes / row["baseline_us"] / 1e3)
    return row


def _bench_gemvs(out: dict[str, Any], setup: Setup, weight: _Weights) -> None:
    """q_proj + kv_a_proj (stacked, norm), o_proj (+ residual), the dense MLP's gate + up (SiLU) and down."""
    text = setup.config.text
    d, heads = text.hidden_size, text.num_attention_heads
    x, act = weight.act(d), weight.act(text.intermediate_size)
    norm = (torch.ones(d, device=setup.device, dtype=torch.bfloat16), text.rms_norm_eps)
    wq, wkv = weight(heads * text.qk_head_dim, d), weight(text.kv_lora_rank + text.qk_rope_head_dim, d)
    wo = weight(d, heads * text.v_head_dim)
    wg, wu, wd = weight(text.intermediate_size, d), weight(text.intermediate_size, d), weight(d, text.intermediate_size)
    cases = {
        "q_kv_a": (lambda: gemv_kernels.gemv_stacked(x, wq, wkv, norm=norm)[0],
                   lambda: gemv_kernels.gemv_reference(x, wq, norm=norm), x, (wq, wkv)),
        "o_proj": (lambda: gemv_kernels.gemv(x, wo, residual=x),
                   lambda: gemv_kernels.gemv_reference(x, wo, residual=x), x, (wo,)),
        "dense_gate_up": (lambda: gemv_kernels.gemv_swiglu(x, wg, wu, norm=norm),
                          lambda: gemv_kernels.swiglu_reference(x, wg, wu, norm), x, (wg, wu)),
        "dense_down": (lambda: gemv_kernels.gemv(act, wd, residual=x),
                       lambda: gemv_kernels.gemv_reference(act, wd, residual=x), act, (wd,)),
    }  # fmt: skip
    for name, (run, ref, xin, weights) in cases.items():
        ws = [weight.bf16(w) for w in weights]
        out[f"{weight.fmt}_{name}"] = _kernel_row(
            setup, run, ref, lambda ws=ws, xin=xin: [F.linear(xin, w) for w in ws], sum(w.nbytes for w in ws)
        )


def _bench_moe_decode(out: dict[str, Any], setup: Setup, weight: _Weights) -> None:
    """One MoE block (routing, 6 of 64 experts, 2 shared) vs torch._grouped_mm + F.linear for the shared MLP."""
    dev, text = setup.device, setup.config.text
    d, inter, e, k = text.hidden_size, text.moe_intermediate_size, text.n_routed_experts, text.num_experts_per_tok
    shared = inter * text.n_shared_experts
    experts = moe_decode.ExpertWeights(
        weight(e, inter, d), weight(e, inter, d), weight(e, d, inter), weight(shared, d), weight(shared, d),
        weight(d, shared),
    )  # fmt: skip
    h = weight.act(d)
    norm = (torch.ones(d, device=dev, dtype=torch.bfloat16), text.rms_norm_eps)
    router = torch.randn(e, d, device=dev, generator=weight.gen) / math.sqrt(d)
    bias = torch.zeros(e, device=dev)
    routing = RoutingConfig(k, 1, 1, text.routed_scaling_factor, text.norm_topk_prob)
    with torch.inference_mode():
        xn, logits = moe_decode.moe_route(h, norm, router)
        _, idx, w = moe_decode.moe_gate_up(xn, experts, routing, logits=logits, bias=bias)
    stacks = [weight.bf16(t) for t in (experts.gate, experts.up, experts.down)]
    shared_ws = [weight.bf16(t) for t in (experts.shared_gate, experts.shared_up, experts.shared_down)]

    def baseline() -> torch.Tensor:
        y = _grouped_mm_moe(xn, idx.long(), w, *stacks)
        return y + F.linear(F.silu(F.linear(xn, shared_ws[0])) * F.linear(xn, shared_ws[1]), shared_ws[2])

    row = _kernel_row(
        setup, lambda: moe_decode.moe_decode(h, norm, router, bias, routing, experts),
        lambda: (h.float() + moe_decode.experts_reference(xn, idx.long(), w, experts).float()).bfloat16(),
        baseline, k * 3 * d * inter * 2 + sum(t.nbytes for t in shared_ws),
    )  # fmt: skip
    expected = (torch.sigmoid(logits) + bias).topk(k, dim=-1).indices.sort().values
    row["routing_matches"] = bool(torch.equal(idx.long().sort().values, expected))
    out[f"{weight.fmt}_moe_block"] = row


def _bench_mla_decode(out: dict[str, Any], setup: Setup, weight: _Weights, slots: int) -> None:
    """Absorbed MLA attention of one token over `slots` cache rows vs a bf16 softmax attention in torch."""
    dev, text = setup.device, setup.config.text
    heads, rank, rope = text.num_attention_heads, text.kv_lora_rank, text.qk_rope_head_dim
    shape = mla_decode.MLAShape(heads, rank, text.qk_nope_head_dim, rope, text.v_head_dim, text.qk_head_dim**-0.5)
    kv_b = weight(heads * (text.qk_nope_head_dim + text.v_head_dim), rank)
    q, kv = weight.act(heads * text.qk_head_dim)[0], weight.act(rank + rope)[0]
    inv_freq = 1.0 / text.rope_theta ** (torch.arange(0, rope, 2, device=dev).float() / rope)
    layer = mla_decode.MLALayer((torch.ones(rank, device=dev, dtype=torch.bfloat16), 1e-6), kv_b, inv_freq, 1.0, shape)
    cache = torch.randn(slots, rank + rope, device=dev, generator=weight.gen).bfloat16()
    position = torch.tensor([slots - 1], device=dev)
    q_abs = torch.randn(heads, rank + rope, device=dev, generator=weight.gen).bfloat16()

    def baseline() -> torch.Tensor:
        p = torch.softmax((q_abs @ cache.t()).float() * shape.scale, dim=-1).bfloat16()
        return p @ cache[:, :rank]

    out[f"{weight.fmt}_mla_{slots}_slots"] = _kernel_row(
        setup, lambda: mla_decode.mla_decode(q, kv, position, cache, layer),
        lambda: mla_decode.mla_decode_reference(q, kv, slots - 1, cache.clone(), layer),
        baseline, 2 * cache.nbytes, slots=slots,
    )  # fmt: skip


@torch.no_grad()
def random_model(config: KimiVLConfig, quant: str, device: str, seed: int = 0) -> KimiVL:
    """The whole model with random weights made on the device (no checkpoint, no host copy): NF4
    codes with a fixed absmax, Gaussian matrices N(0, 1/fan_in), unit norms, zero biases."""
    with torch.device("meta"):
        model = KimiVL(config)
    quantize_linears_(model.language_model, quant, device="meta")
    materialize(model, torch.bfloat16, device)
    gen = torch.Generator(device).manual_seed(seed)
    for name, t in model.state_dict(keep_vars=True).items():  # parameters and persistent buffers
        if t.dtype == torch.uint8:
            t.random_(0, 256, generator=gen)
        elif name.endswith("absmax"):
            t.fill_(2.5 / math.sqrt(t.shape[-1] * 64))
        elif t.is_floating_point() and t.dim() >= 2:
            t.normal_(0, 1 / math.sqrt(t.shape[-1]), generator=gen)
        elif t.is_floating_point():
            t.fill_(1.0 if name.endswith("weight") else 0.0)
    return model.eval()


def _decode(engine: Engine, context: int, new_tokens: int) -> dict[str, Any]:
    """Greedy decode after a `context`-token prompt, twice: the first run captures the graphs."""
    ids = torch.randint(0, engine.config.text.vocab_size - 512, (context,))
    params = SamplingParams(temperature=0.0, max_new_tokens=new_tokens)
    rates = []
    for _ in range(2):
        stream = engine.generate_ids(ids, params=params, stop_ids=())
        for _token in stream:
            pass
        steps = stream.stats.generated_tokens - 1  # the last token needs no forward pass
        rates.append(round(steps / stream.stats.decode_s, 2))
    return {"tokens_per_s": rates[1], "first_run_tokens_per_s": rates[0], "prefill_s": round(stream.stats.prefill_s, 3)}


def _prefill(engine: Engine, length: int, device: str) -> float:
    cache = LatentCache(engine.config.text, 1, length, engine.dtype, engine.device)
    ids = torch.randint(0, engine.config.text.vocab_size - 512, (1, length), device=engine.device)
    with torch.inference_mode():
        engine.prefill(ids, None, cache)  # warm-up: kernel builds
        _sync(device)
        t0 = time.perf_counter()
        engine.prefill(ids, None, cache)
        _sync(device)
    return round(length / (time.perf_counter() - t0), 1)


def _vision(engine: Engine, size: int, device: str) -> dict[str, Any]:
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (size, size, 3), dtype=np.uint8))
    images = process_images([image], engine.image_config)
    pixels = images.pixel_values.to(device)
    with torch.inference_mode():
        ms = timed_ms(lambda: engine.model.encode_images(pixels, images.grid_hws), device, 3, warmup=1)
    return {"patches": int(pixels.shape[0]), "ms": ms}


def _kernels_per_step(engine: Engine, context: int) -> dict[str, int]:
    """CUDA kernels and memcpys of one eager decode step, from the profiler."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    cache = LatentCache(engine.config.text, 1, context + 1, engine.dtype, engine.device)
    tokens = torch.zeros(1, 1, dtype=torch.long, device="cuda")
    positions = torch.full((1, 1), context, device="cuda")
    with torch.inference_mode():
        engine.decode_step(tokens, positions, cache, context + 1)
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            engine.decode_step(tokens, positions, cache, context + 1)
            torch.cuda.synchronize()
    gpu = [e.name.lower() for e in prof.events() if e.device_type == DeviceType.CUDA]
    copies = sum("memcpy" in name for name in gpu)
    return {"kernels": len(gpu) - copies - sum("memset" in name for name in gpu), "memcpys": copies}


def bench_model(out: dict[str, Any], setup: Setup, quant: str) -> None:
    dev = setup.device
    if dev == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    model = random_model(setup.config, quant, dev)
    _sync(dev)
    out["build_s"] = round(time.perf_counter() - t0, 1)
    out["weights_gb"] = _sig(sum(t.nbytes for t in model.state_dict().values()) / 1e9)
    engine = Engine(model, setup.config)
    for context in setup.decode_contexts:
        _attempt(out, f"decode_{context}", lambda context=context: _decode(engine, context, setup.decode_tokens))
    if engine.fused_decode is not None:  # the module path beside it, at the first context
        engine.fused_decode, engine._graph = None, None
        context = setup.decode_contexts[0]
        _attempt(out, f"decode_{context}_module_path", lambda: _decode(engine, context, setup.decode_tokens))
    for length in setup.prefill_lengths:
        _attempt(out, f"prefill_{length}_tokens_per_s", lambda length=length: _prefill(engine, length, dev))
    if setup.image_size:
        _attempt(out, f"vision_{setup.image_size}px", lambda: _vision(engine, setup.image_size, dev))
    if dev == "cuda":
        _attempt(out, "per_decode_step", lambda: _kernels_per_step(engine, min(setup.decode_contexts)))
        out["peak_vram_gb"] = round(torch.cuda.max_memory_allocated() / 1e9, 2)


def bench_traced(out: dict[str, Any], setup: Setup) -> None:
    """One decode step at position 1K of a 1K + 32K request, traced on fake tensors (no device used)."""
    for quant in setup.quants:
        summary = decode_trace(quant, 1024, 32768, setup.config).summary()
        out[quant] = {k: summary[k] for k in ("launches", "bytes", "copies", "syncs")}


def run(setup: Setup, report: Report) -> None:
    with report.section("env") as out:
        bench_env(out, setup)
    with report.section("moe") as out:
        bench_moe(out, setup)
    with report.section("dense") as out:
        bench_dense(out, setup)
    with report.section("decode_kernels") as out:
        bench_decode_kernels(out, setup)
    for quant in setup.quants:
        with report.section(f"model_{'bf16' if quant == 'none' else quant}") as out:
            bench_model(out, setup, quant)
    with report.section("traced") as out:
        bench_traced(out, setup)


def default_out() -> Path:
    return Path(os.environ["OUT"], "gpu_bench.json") if os.environ.get("OUT") else Path("gpu_bench.json")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer sizes, NF4 only: under 3 minutes")
    parser.add_argument("--out", type=Path, default=None, help="the JSON file (default $OUT/gpu_bench.json)")
    args = parser.parse_args(argv)
    report = Report(args.out or default_out())
    if not torch.cuda.is_available():
        report.data["errors"]["env"] = "no CUDA device"
        report.write()
        print("no CUDA device: benchmarks/gpu needs an NVIDIA GPU (this machine has none)", file=sys.stderr)
        return 1
    run(Setup.full(args.quick), report)
    print(json.dumps(report.data, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
