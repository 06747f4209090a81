"""Ahead-of-time compilation of our Triton kernels for real NVIDIA targets, on a machine without a GPU.

`engine_launches()` runs the engine's own code on fake CUDA tensors (`gpu_trace.CudaTrace`) at
Kimi-VL's per-layer shapes (one dense and one MoE layer: the launches repeat per layer), NF4 and
bf16: a batch-1 decode step, and prefill chunks of 512 and 1,024 tokens. It collects every Triton
launch made, with its arguments. (No Triton kernel serves the vision tower: it is plain bf16 torch.)

`compile_launch(launch, cc)` specialises a launch exactly as Triton's JIT would (signature,
constexprs, divisibility attributes, num_warps/num_stages), compiles it for compute capability
`cc` with the ptxas inside the triton wheel, and reads shared memory from the kernel's metadata
and registers and spills from `ptxas -v`.

Kernels must be real `JITFunction`s, so this runs without `TRITON_INTERPRET`: tests/gpu starts
`python -m kimivl_cli.testing.triton_aot`, which prints one JSON report.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import subprocess
import sys
import tempfile
from typing import Any

import torch

from kimivl_cli.model.cache import LatentCache
from kimivl_cli.model.config import KimiVLConfig
from kimivl_cli.testing.gpu_trace import CudaTrace, TritonLaunch, fake_engine

# Largest dynamic shared memory a block may opt into, per compute capability (CUDA programming
# guide, "Technical specifications per compute capability").
SHARED_LIMIT = {80: 166_912, 86: 101_376, 89: 101_376, 90: 232_448, 100: 232_448, 120: 101_376}
PREFILL_CHUNKS = (512, 1024)


def missing_backend() -> str | None:
    """Why this triton cannot compile for NVIDIA targets here, or None when it can."""
    try:
        from triton.backends import backends
        from triton.backends.nvidia.compiler import get_ptxas
    except ImportError as exc:
        return f"triton without the NVIDIA backend ({exc})"
    if "nvidia" not in backends:
        return "triton without the NVIDIA backend"
    try:
        get_ptxas(80).path  # noqa: B018 (resolving the path finds the bundled binary)
    except Exception as exc:  # the knob raises its own error types when the binary is missing
        return f"no ptxas in the triton wheel ({exc})"
    return None


def engine_launches(config: KimiVLConfig | None = None) -> dict[str, list[TritonLaunch]]:
    """Triton launches per engine case ("nf4 decode", "bf16 prefill 512", ...) at Kimi-VL's shapes."""
    cfg = config or KimiVLConfig()
    cfg = dataclasses.replace(
        cfg, text=dataclasses.replace(cfg.text, num_hidden_layers=cfg.text.first_k_dense_replace + 1)
    )
    cases: dict[str, list[TritonLaunch]] = {}
    for quant, name in (("nf4", "nf4"), ("none", "bf16")):
        with CudaTrace() as trace, torch.inference_mode():
            engine = fake_engine(quant, cfg)
            cache = LatentCache(cfg.text, 1, max(PREFILL_CHUNKS) + 1, engine.dtype, engine.device)
            for tokens in PREFILL_CHUNKS:
                trace.reset()
                engine.prefill(torch.zeros(1, tokens, dtype=torch.long, device="cuda"), None, cache)
                cases[f"{name} prefill {tokens}"] = list(trace.triton_launches)
            trace.reset()
            position = torch.full((1, 1), max(PREFILL_CHUNKS), device="cuda")
            engine.decode_step(torch.zeros(1, 1, dtype=torch.long, device="cuda"), position, cache, cache.capacity)
            cases[f"{name} decode"] = list(trace.triton_launches)
    return cases


def _mock_args(launch: TritonLaunch) -> dict[str, Any]:
    from triton.runtime.jit import MockTensor

    # A mock tensor's data_ptr() is 0: 16-byte aligned, as every torch allocation is.
    return {k: MockTensor(v.dtype, list(v.shape)) if isinstance(v, torch.Tensor) else v for k, v in launch.args.items()}


def specialise(launch: TritonLaunch, cc: int) -> tuple[Any, Any, dict[str, Any]]:
    """(ASTSource, GPUTarget, options) as Triton's JIT builds them for this launch on `cc`."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature

    kernel = launch.kernel
    target = GPUTarget("cuda", cc, 32)
    backend = make_backend(target)
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    bound, specialization, options = binder(**_mock_args(launch), **launch.options)
    options, signature, constexprs, attrs = kernel._pack_args(backend, launch.options, bound, specialization, options)
    return ASTSource(kernel, signature, constexprs, attrs), target, options.__dict__


def _ptxas_usage(ptx: str, cc: int) -> tuple[int, int]:
    """(registers per thread, spill bytes stored + loaded) from `ptxas -v` for `cc`."""
    from triton.backends.nvidia.compiler import get_ptxas, sm_arch_from_capability

    with tempfile.TemporaryDirectory() as tmp:
        source = os.path.join(tmp, "kernel.ptx")
        with open(source, "w") as fh:
            fh.write(ptx)
        arch = sm_arch_from_capability(cc)
        cmd = [get_ptxas(cc).path, "-v", f"--gpu-name={arch}", source, "-o", os.path.join(tmp, "kernel.cubin")]
        log = subprocess.run(cmd, capture_output=True, text=True, check=True).stderr
    registers = int(re.search(r"Used (\d+) registers", log).group(1))
    spills = sum(int(n) for n in re.findall(r"(\d+) bytes spill (?:stores|loads)", log))
    return registers, spills


def compile_launch(launch: TritonLaunch, cc: int) -> dict[str, Any]:
    """Compile one launch for `cc`: shared memory, registers, spills (or the error)."""
    import triton

    source, target, options = specialise(launch, cc)
    try:
        compiled = triton.compile(source, target=target, options=options)
    except Exception as exc:  # a compile failure is the finding: report it, go on with the others
        return {"cc": cc, "error": f"{type(exc).__name__}: {str(exc)[-400:]}"}
    registers, spills = _ptxas_usage(compiled.asm["ptx"], cc)
    return {
        "cc": cc,
        "shared": compiled.metadata.shared,
        "shared_limit": SHARED_LIMIT[cc],
        "registers": registers,
        "spills": spills,
        "num_warps": compiled.metadata.num_warps,
        "num_stages": compiled.metadata.num_stages,
    }


def describe(launch: TritonLaunch) -> dict[str, Any]:
    """A launch for people: kernel, constexprs (a Triton dtype as its name), tensor dtypes, options."""
    params = launch.kernel.params
    constexprs = {p.name for p in params if p.is_constexpr}
    args = {k: str(v.dtype).removeprefix("torch.") if isinstance(v, torch.Tensor) else v
            for k, v in launch.args.items() if k in constexprs or isinstance(v, torch.Tensor)}  # fmt: skip
    args = {k: v if isinstance(v, int | float | str | None) else str(v) for k, v in args.items()}
    return {"kernel": launch.kernel.fn.__name__, "where": launch.where, **args, **launch.options}


def report(targets: tuple[int, ...] = tuple(SHARED_LIMIT)) -> list[dict[str, Any]]:
    """Every distinct specialisation the engine cases launch, compiled for every target."""
    unique: dict[str, tuple[TritonLaunch, set[str]]] = {}
    for case, launches in engine_launches().items():
        for launch in launches:
            source, _, options = specialise(launch, min(targets))
            key = repr((launch.kernel.fn.__name__, source.signature, source.constants, source.attrs, options))
            unique.setdefault(key, (launch, set()))[1].add(case)
    return [
        {**describe(launch), "cases": sorted(cases), **compile_launch(launch, cc)}
        for launch, cases in unique.values()
        for cc in targets
    ]


if __name__ == "__main__":
    if os.environ.get("TRITON_INTERPRET") == "1":
        sys.exit("run without TRITON_INTERPRET=1: compiling needs real JIT kernels")
    reason = missing_backend()
    if reason:
        sys.exit(reason)
    json.dump(report(), sys.stdout, indent=1)
