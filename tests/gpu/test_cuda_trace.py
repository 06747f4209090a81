"""The CUDA path traced without a GPU: fake CUDA tensors take every CUDA branch (`gpu_trace.CudaTrace`).

- one full-size decode step (27 layers, NF4 and bf16) as the engine replays it from a CUDA graph:
  no host-device copy, no synchronisation, a launch budget, attention over the slots in use;
- which kernels a CUDA tensor reaches in each module (the decision logic the CPU suite never runs);
- the tracer itself sees what it claims to (a copy, a sync, a Triton launch).
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import pytest
import torch

from kimivl_cli.engine.graph import MIN_BUCKET, attention_bucket, cache_bucket
from kimivl_cli.kernels.moe_triton import nf4_matmul
from kimivl_cli.model.config import TextConfig
from kimivl_cli.model.hooks import place
from kimivl_cli.model.language import RoutedExperts
from kimivl_cli.model.weights import materialize
from kimivl_cli.quant.modules import NF4Experts, NF4Linear, NF4SwiGLU
from kimivl_cli.testing.gpu_trace import CudaTrace, TraceUnavailable, decode_trace

POSITION, MAX_NEW = 1024, 32768  # a Thinking request: 1K prompt tokens, its default 32K new tokens
LAUNCH_BUDGET = 400  # per NF4 or bf16 decode token (issue 14); the module path took ~1,900, ~2,900 before issue 13
MLA = ("_mla_prep_kernel", "_mla_attend_kernel", "_mla_out_kernel")


@pytest.fixture(scope="module", params=["nf4", "none"])
def step(request) -> tuple[str, CudaTrace]:
    try:
        return request.param, decode_trace(request.param, POSITION, MAX_NEW)
    except TraceUnavailable as exc:
        pytest.skip(str(exc))


def test_a_decode_step_has_no_copy_and_no_sync(step) -> None:
    _, trace = step
    assert trace.count("copy") == 0 and trace.count("sync") == 0, trace.summary()["sync_sites"]


def test_a_decode_step_keeps_its_launch_budget(step) -> None:
    _, trace = step
    assert trace.count("launch") <= LAUNCH_BUDGET


def test_a_decode_step_is_the_fused_kernels(step) -> None:
    """Per layer: q/kv_a (norm fused), three MLA kernels, o_proj (+ residual), then the MoE's route,
    gate+up and down (+ residual), or the dense MLP's gate+up and down; lm_head with the final norm."""
    _, trace = step
    cfg = TextConfig()
    moe = cfg.num_hidden_layers - cfg.first_k_dense_replace
    kernels = trace.by("kernel")
    assert {k: kernels[f"triton.{k}"] for k in MLA} == dict.fromkeys(MLA, cfg.num_hidden_layers)
    assert kernels["triton._moe_route_kernel"] == kernels["triton._moe_gate_up_kernel"] == moe
    assert kernels["triton._moe_down_kernel"] == moe
    assert kernels["triton._gemv_kernel"] == 2 * cfg.num_hidden_layers + 2 * cfg.first_k_dense_replace + 1
    moe_kernels = ("_moe_route_kernel", "_moe_gate_up_kernel", "_moe_down_kernel", "_gemv_kernel")
    assert set(kernels) == {f"triton.{k}" for k in (*MLA, *moe_kernels)} | {"aten.embedding"}  # nothing else
    grids = {(launch.kernel.fn.__name__, launch.grid) for launch in trace.triton_launches}
    streaming = {"_gemv_kernel", "_moe_gate_up_kernel", "_moe_down_kernel"}  # >= 1 MB of weights each
    assert all(math.prod(grid) >= 264 for name, grid in grids if name in streaming)  # 2 waves of 132 SMs


def test_decode_attention_reads_the_slots_in_use_not_the_cache(step) -> None:
    """27 layers x slots x 576 x 2 B, read once, plus the split partials: at position 1K of a 64K
    cache the step reads the 1,025 slots in use (the kernels read the position on the device)."""
    _, trace = step
    cfg = TextConfig()
    used = POSITION + 1
    read_once = cfg.num_hidden_layers * used * cfg.cache_width * 2
    attention = trace.bytes("kernels/mla_decode.py:mla_attend")
    assert read_once <= attention <= 1.5 * read_once
    capacity = cache_bucket(POSITION + MAX_NEW, cfg.max_position_embeddings)
    assert attention < read_once * capacity / used / 20  # the whole cache would be 64x


def test_the_routed_experts_read_weights_in_place(step) -> None:
    """The chosen experts' weights are read where they are (no gathered copy, no grouped GEMM
    alignment): 6 routed + 2 shared experts' rows per MoE layer, NF4 or bf16."""
    quant, trace = step
    cfg = TextConfig()
    moe = cfg.num_hidden_layers - cfg.first_k_dense_replace
    per_weight = 0.5 + 4 / 64 if quant == "nf4" else 2
    experts = (cfg.num_experts_per_tok + cfg.n_shared_experts) * 3 * cfg.hidden_size * cfg.moe_intermediate_size
    read = trace.bytes("kernels/moe_decode.py:moe_gate_up") + trace.bytes("kernels/moe_decode.py:moe_down")
    assert moe * experts * per_weight <= read <= 1.02 * moe * experts * per_weight
    assert not any("_gathered" in where for where in trace.by("where"))
    assert "triton._grouped_gemm" not in trace.by("kernel")


@pytest.fixture
def trace() -> Iterator[CudaTrace]:
    try:
        with CudaTrace() as trace:
            yield trace
    except TraceUnavailable as exc:
        pytest.skip(str(exc))


@pytest.mark.parametrize("tokens", [1, 512])
def test_cuda_tensors_reach_the_triton_kernels_in_every_module(trace: CudaTrace, tokens: int) -> None:
    """Decode and prefill sizes alike: one kernel per NF4 linear, two per MoE (NF4 or bf16 experts),
    and nothing that reads device data on the host (the CPU paths' per-expert `.tolist()`)."""
    x = torch.zeros(tokens, 128, dtype=torch.bfloat16, device="cuda")
    idx = torch.zeros(tokens, 2, dtype=torch.long, device="cuda")
    w = torch.ones(tokens, 2, device="cuda")
    with torch.device("meta"):
        bf16 = RoutedExperts(4, 128, 64)
    bf16 = materialize(bf16, torch.bfloat16, "cuda")  # the loader swaps in the module for the device
    cases = {
        "NF4Linear": (lambda: place(NF4Linear(128, 64, "cuda"), "cuda")(x), 1),
        "NF4SwiGLU": (lambda: place(NF4SwiGLU(128, 64, "cuda"), "cuda")(x), 3),
        "NF4Experts": (lambda: place(NF4Experts(4, 128, 64, "cuda"), "cuda")(x, idx, w), 2),
        "RoutedExperts": (lambda: bf16(x, idx, w), 2),
    }
    for name, (run, kernels) in cases.items():
        trace.reset()
        with torch.inference_mode():
            run()
        assert trace.by("kernel")["triton._grouped_gemm"] == kernels, name
        assert trace.count("sync") == trace.count("copy") == 0, (name, trace.summary()["sync_sites"])


def test_the_tracer_sees_copies_syncs_and_triton_launches(trace: CudaTrace) -> None:
    table = torch.tensor([1.0, 2.0], device="cuda")  # host data to the device: a copy and a wait
    assert (trace.count("copy"), trace.count("sync")) == (1, 1)
    trace.reset()
    x = torch.ones(8, 64, device="cuda") * table[0]
    _ = x.sum().item()  # a device value read on the host
    _ = torch.nonzero(x)
    assert trace.count("sync") == 2 and trace.count("launch") == 4  # ones (a fill), mul, sum, nonzero
    packed, absmax = torch.zeros(64, 32, dtype=torch.uint8, device="cuda"), torch.ones(64, 1, device="cuda")
    trace.reset()
    nf4_matmul(x, packed, absmax)
    (launch,) = trace.triton_launches
    assert launch.kernel.fn.__name__ == "_grouped_gemm" and launch.grid == (1, 1)
    assert trace.bytes() == 64 * 32 + 64 * 4 + 2 * 8 * 64 * 4  # codes, absmax, rows in and out


def test_attention_buckets_follow_the_position() -> None:
    capacity = 1 << 16
    buckets = {attention_bucket(slots, capacity) for slots in range(1, capacity + 1)}
    assert len(buckets) <= 17 and min(buckets) == MIN_BUCKET and max(buckets) == capacity
    for slots in (1, 255, 256, 257, 1025, 40_000, capacity):
        size = attention_bucket(slots, capacity)
        assert slots <= size <= max(MIN_BUCKET, 1.5 * slots)
    assert attention_bucket(5000, 4096) == 4096
