"""Our Triton kernels as a GPU would run them, checked without one.

`recorded_launches()` catches every Triton launch made inside it (kernel, bound arguments, grid,
num_warps/num_stages) instead of running it, so a step can run on meta tensors and be counted;
`compile_launch` compiles one recorded launch ahead of time for a real NVIDIA target with the
same argument specialisation the runtime would use (16-byte divisibility of pointers and ints),
and reads the cubin's resources (registers, spill stack, local memory, shared memory) with the
cuobjdump shipped inside the triton wheel.

`decode_launches` records one full-size Kimi-VL decode step (the fused CUDA path) on the meta
device; `python -m kimivl_cli.testing.aot` compiles each distinct launch of it, NF4 and bf16,
for every target and prints a JSON report. Compiling needs the JIT kernels, not the
interpreter's: run it in a process without `TRITON_INTERPRET=1` (what the tests do).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import triton

# Shared memory one block may use (opt-in maximum), by compute capability.
SHARED_LIMIT = {80: 166_912, 86: 101_376, 89: 101_376, 90: 232_448}
TARGETS = tuple(SHARED_LIMIT)

_DTYPES = {
    torch.float32: "fp32",
    torch.float16: "fp16",
    torch.bfloat16: "bf16",
    torch.uint8: "u8",
    torch.int8: "i8",
    torch.int16: "i16",
    torch.int32: "i32",
    torch.int64: "i64",
    torch.bool: "i1",
}


@dataclass
class Launch:
    """One kernel launch as the runtime would see it."""

    kernel: Any  # JITFunction
    args: dict[str, Any]  # every parameter by name, constexprs included
    grid: tuple[int, ...]
    options: dict[str, int] = field(default_factory=dict)  # num_warps, num_stages

    @property
    def name(self) -> str:
        return self.kernel.fn.__name__

    @property
    def programs(self) -> int:
        n = 1
        for g in self.grid:
            n *= g
        return n

    def constexprs(self) -> dict[str, Any]:
        params = _params(self.kernel)
        return {p.name: self.args[p.name] for p in params if p.is_constexpr}

    def key(self) -> tuple:
        """What selects a compiled binary: kernel, argument types and alignment, constexprs, options."""
        sig, attrs = _signature(self)
        constexprs = tuple((k, str(v)) for k, v in self.constexprs().items())
        return (self.name, tuple(sig.items()), constexprs, tuple(sorted(attrs)), tuple(sorted(self.options.items())))


_JIT_OF: dict[Any, Any] = {}


def _jit(kernel: Any) -> Any:
    """The JITFunction of a kernel (the interpreter wraps the plain function instead)."""
    from triton.runtime.jit import JITFunction

    if isinstance(kernel, JITFunction):
        return kernel
    if kernel.fn not in _JIT_OF:
        _JIT_OF[kernel.fn] = JITFunction(kernel.fn)
    return _JIT_OF[kernel.fn]


def _params(kernel: Any) -> list:
    return _jit(kernel).params


def _grid(grid: Any, args: dict[str, Any]) -> tuple[int, ...]:
    grid = grid(args) if callable(grid) else grid
    return tuple(int(g) for g in grid)


@contextlib.contextmanager
def recorded_launches() -> Iterator[list[Launch]]:
    """Record Triton launches instead of running them (JIT and interpreter alike)."""
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction

    launches: list[Launch] = []
    option_names = ("num_warps", "num_stages", "num_ctas", "maxnreg")

    def record(self, *args, grid, warmup=False, **kwargs):
        params = _params(self)
        options = {k: kwargs.pop(k) for k in option_names if k in kwargs}
        bound = dict(zip((p.name for p in params), args, strict=False))
        bound.update(kwargs)
        for p in params:
            if p.name not in bound and p.has_default:
                bound[p.name] = p.default
        launches.append(Launch(_jit(self), bound, _grid(grid, bound), options))

    saved = JITFunction.run, InterpretedFunction.run
    JITFunction.run = record
    InterpretedFunction.run = record
    try:
        yield launches
    finally:
        JITFunction.run, InterpretedFunction.run = saved


def _signature(launch: Launch) -> tuple[dict[str, str], dict[tuple[int, ...], list]]:
    """Triton signature and divisibility attributes, as `JITFunction.run` would specialise them."""
    sig: dict[str, str] = {}
    attrs: dict[tuple[int, ...], list] = {}
    for i, p in enumerate(_params(launch.kernel)):
        value = launch.args[p.name]
        if p.is_constexpr:
            sig[p.name] = "constexpr"
            continue
        aligned = False
        if isinstance(value, torch.Tensor):
            sig[p.name] = "*" + _DTYPES[value.dtype]
            aligned = (value.storage_offset() * value.element_size()) % 16 == 0
        elif isinstance(value, bool):
            sig[p.name] = "i1"
        elif isinstance(value, int):
            sig[p.name] = "i32" if -(2**31) <= value < 2**31 else "i64"
            aligned = value % 16 == 0
        elif isinstance(value, float):
            sig[p.name] = "fp32"
        else:
            raise TypeError(f"{launch.name}: cannot type argument {p.name}={value!r}")
        if aligned and not p.do_not_specialize:
            attrs[(i,)] = [["tt.divisibility", 16]]
    return sig, attrs


@dataclass
class Compiled:
    name: str
    cc: int
    shared: int  # bytes of shared memory per block
    registers: int
    spill_bytes: int  # stack + local memory per thread (0: no spills)
    num_warps: int
    ptx: str
    sass: str

    @property
    def fits(self) -> bool:
        return self.shared <= SHARED_LIMIT[self.cc]


def _tool(name: str) -> str:
    import triton.backends.nvidia as nvidia

    return os.path.join(os.path.dirname(nvidia.__file__), "bin", name)


def compile_launch(launch: Launch, cc: int, sass: bool = False) -> Compiled:
    """Compile `launch` for sm_`cc` (no GPU needed) and read its resources (and its SASS: ~1 s more)."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    sig, attrs = _signature(launch)
    src = ASTSource(fn=launch.kernel, signature=sig, constexprs=launch.constexprs(), attrs=attrs)
    options = {k: v for k, v in launch.options.items() if k in ("num_warps", "num_stages")}
    compiled = triton.compile(src, target=GPUTarget("cuda", cc, 32), options=options)
    usage, text = _cubin_info(compiled.asm["cubin"], sass)
    return Compiled(
        launch.name,
        cc,
        compiled.metadata.shared,
        usage["REG"],
        usage["STACK"] + usage["LOCAL"],
        compiled.metadata.num_warps,
        compiled.asm["ptx"],
        text,
    )


def _cubin_info(cubin: bytes, sass: bool) -> tuple[dict[str, int], str]:
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()

        def dump(what: str) -> str:
            return subprocess.run([_tool("cuobjdump"), what, f.name], capture_output=True, text=True, check=True).stdout

        usage = dump("--dump-resource-usage")
        text = dump("--dump-sass") if sass else ""
    found = dict(re.findall(r"\b(REG|STACK|LOCAL|SHARED):(\d+)", usage))
    return {k: int(found.get(k, 0)) for k in ("REG", "STACK", "LOCAL", "SHARED")}, text


def nvidia_backend_available() -> bool:
    try:
        import triton.backends.nvidia  # noqa: F401
    except ImportError:
        return False
    return os.path.exists(_tool("ptxas")) and os.path.exists(_tool("cuobjdump"))


def loop_instructions(sass: str) -> int:
    """SASS instructions in the kernel's largest loop body (0 if it has no loop): what one step costs."""
    lines = re.findall(r"^\s+/\*([0-9a-f]{4,})\*/\s+(.*)$", sass, re.M)
    body = 0
    for addr, text in lines:
        jump = re.search(r"\bBRA\s+(?:`\(\.L_x_\d+\)\s*)?0x([0-9a-f]+)", text)
        if jump and int(jump.group(1), 16) < int(addr, 16):
            start, end = int(jump.group(1), 16), int(addr, 16)
            body = max(body, sum(1 for a, _ in lines if start <= int(a, 16) <= end))
    return body


def decode_launches(quant: str, position: int = 1023, capacity: int = 4096) -> list[Launch]:
    """The Triton launches of one batch-1 decode step of the full-size model (`FusedDecoder`), on meta
    tensors. quant: "nf4" | "none" (bf16)."""
    from kimivl_cli.model.cache import LatentCache
    from kimivl_cli.model.config import TextConfig
    from kimivl_cli.model.fused_decode import FusedDecoder
    from kimivl_cli.model.language import LanguageModel
    from kimivl_cli.model.weights import materialize
    from kimivl_cli.quant.modules import quantize_linears_

    cfg = TextConfig()
    with torch.device("meta"):
        lm = LanguageModel(cfg)
    quantize_linears_(lm, quant, device="meta")
    materialize(lm, torch.bfloat16, "meta")
    decoder = FusedDecoder(lm)
    cache = LatentCache(cfg, 1, capacity, torch.bfloat16, "meta")
    tokens = torch.zeros(1, 1, dtype=torch.long, device="meta")
    positions = torch.full((1, 1), position, dtype=torch.long, device="meta")
    with recorded_launches() as launches:
        decoder(tokens, positions, cache)
    return launches


def distinct(launches: list[Launch]) -> list[Launch]:
    """One launch per compiled binary (the first seen)."""
    seen: dict[tuple, Launch] = {}
    for launch in launches:
        seen.setdefault(launch.key(), launch)
    return list(seen.values())


_POOL_LAUNCHES: list[Launch] = []


def _compile_job(job: tuple[int, int, bool]) -> dict[str, Any]:
    index, cc, sass = job
    launch = _POOL_LAUNCHES[index]
    found = compile_launch(launch, cc, sass)
    report = {k: v for k, v in asdict(found).items() if k not in ("ptx", "sass")}
    constexprs = {k: str(v) if not isinstance(v, int | float | bool) else v for k, v in launch.constexprs().items()}
    return {
        **report,
        "shared_limit": SHARED_LIMIT[cc],
        "grid": list(launch.grid),
        "programs": launch.programs,
        "constexprs": constexprs,
        **({"loop_instructions": loop_instructions(found.sass)} if sass else {}),
    }


def report(targets: tuple[int, ...] = TARGETS, sass: bool = False, workers: int = 2) -> list[dict[str, Any]]:
    """Every distinct launch of an NF4 and a bf16 decode step, compiled for every target
    (with `sass`, also the SASS instructions of each kernel's main loop)."""
    launches = distinct(decode_launches("nf4") + decode_launches("none"))
    _POOL_LAUNCHES[:] = launches
    jobs = [(i, cc, sass) for i in range(len(launches)) for cc in targets]
    with ProcessPoolExecutor(workers) as pool:  # forked: the workers inherit the launches
        return list(pool.map(_compile_job, jobs))


if __name__ == "__main__":
    if os.environ.get("TRITON_INTERPRET") == "1":
        sys.exit("run without TRITON_INTERPRET=1: compiling needs the JIT kernels")
    if not nvidia_backend_available():
        sys.exit("this triton has no NVIDIA backend (ptxas, cuobjdump)")
    json.dump(report(sass="--sass" in sys.argv), sys.stdout, indent=1)
