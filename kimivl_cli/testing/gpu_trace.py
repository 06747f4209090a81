"""What a piece of code would run on a CUDA device, traced on a machine without one.

`CudaTrace` runs code on fake CUDA tensors (`FakeTensorMode`: meta storage, `device="cuda"`, so
`x.is_cuda` is true and every CUDA branch is taken) and records, per operation:

- a kernel launch for every ATen op that computes (views, allocations and metadata queries do
  not launch) and for every Triton kernel launch (intercepted, never run);
- a host-device copy for every transfer between the host and the device;
- a host synchronisation for every op that reads device data on the host (`.item()`, `.tolist()`,
  `bool(t)`, `nonzero`, boolean-mask indexing...): each stalls the CPU and breaks CUDA-graph capture;
- the bytes each launch moves (see `aten_bytes` and `TRITON_BYTES`: a traffic model, not a
  measurement) and where it came from (the innermost `kimivl_cli` function).

`decode_trace` builds the full-size Kimi-VL model this way (no memory: fake tensors have no
storage) and traces one batch-1 decode step exactly as the engine captures it in a CUDA graph.
"""

from __future__ import annotations

import ctypes
import hashlib
import inspect
import os
import shutil
import subprocess
import sys
import tempfile
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.experimental.symbolic_shapes import ShapeEnv
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from kimivl_cli.engine.engine import Engine
from kimivl_cli.engine.graph import attention_bucket, cache_bucket
from kimivl_cli.model.cache import LatentCache
from kimivl_cli.model.config import KimiVLConfig
from kimivl_cli.model.kimivl import KimiVL
from kimivl_cli.model.weights import materialize
from kimivl_cli.quant.modules import quantize_linears_
from kimivl_cli.testing.decode_bytes import DECODE_BYTES

_PACKAGE = Path(__file__).resolve().parents[1]
_aten = torch.ops.aten

# Ops that read device data on the host (or size their output by it, which needs the same read).
SYNC_OPS = {
    _aten.nonzero.default,
    _aten.masked_select.default,
    _aten.bincount.default,
    _aten.equal.default,
    _aten.is_nonzero.default,
    _aten.unique_consecutive.default,
    _aten._unique2.default,
    _aten.unique_dim.default,
    _aten.repeat_interleave.Tensor,
}
_SCALAR_READS = {_aten._local_scalar_dense.default, _aten.item.default}
# Ops that only allocate or describe tensors: no kernel.
_NO_KERNEL = {
    _aten.empty.memory_format,
    _aten.empty_strided.default,
    _aten.empty_like.default,
    _aten.new_empty.default,
    _aten.new_empty_strided.default,
    _aten.lift_fresh.default,
    _aten.detach.default,
    _aten.detach_.default,
    _aten.alias.default,
    _aten.sym_size.int,
    _aten.sym_stride.int,
    _aten.sym_numel.default,
    _aten.sym_storage_offset.default,
    _aten.is_same_size.default,
    _aten._has_compatible_shallow_copy_type.default,
}
# Ops that read only the rows they return (plus their index), not the whole source tensor.
_GATHERS = {
    _aten.embedding.default,
    _aten.index.Tensor,
    _aten.index_select.default,
    _aten.gather.default,
    _aten.take.default,
}
# In-place ops that write only the rows they are given (source + index), not the whole target.
_SCATTERS = {
    _aten.scatter_.src,
    _aten.scatter_.value,
    _aten.scatter_add_.default,
    _aten.index_put_.default,
    _aten.index_copy_.default,
    _aten.index_add_.default,
    _aten.masked_scatter_.default,
}


@dataclass
class Event:
    kind: str  # "launch" | "copy" | "sync" | "host" (an op on host tensors: no kernel)
    kernel: str  # "aten.mm", "triton._grouped_gemm"
    where: str  # innermost kimivl_cli function, e.g. "model/cache.py:attend_shared"
    bytes: int = 0


def _tensors(tree: Any) -> list[torch.Tensor]:
    seen: dict[int, torch.Tensor] = {}
    for leaf in tree_flatten(tree)[0]:
        if isinstance(leaf, torch.Tensor):
            seen.setdefault(id(leaf), leaf)
    return list(seen.values())


def _nbytes(t: torch.Tensor) -> int:
    n = t.numel()
    return n * t.element_size() if isinstance(n, int) else 0  # a data-dependent size: unknown here


def aten_bytes(func: torch._ops.OpOverload, args: tuple, kwargs: dict, out: Any) -> int:
    """Bytes an ATen op moves: what it reads plus what it writes, counting each tensor once.

    Gathers read only the rows they return; scatters write only the rows they are given.
    """
    ins, outs = _tensors((args, kwargs)), _tensors(out)
    if func in _GATHERS:
        index = sum(_nbytes(t) for t in ins[1:] if not t.is_floating_point())
        return index + 2 * sum(_nbytes(t) for t in outs)
    if func in _SCATTERS:
        return 2 * sum(_nbytes(t) for t in ins[1:])
    if func is _aten.copy_.default:
        return 2 * _nbytes(ins[1])
    return sum(_nbytes(t) for t in ins) + sum(_nbytes(t) for t in outs if all(t is not i for i in ins))


def _grouped_gemm_bytes(a: dict[str, Any], grid: tuple[int, ...], slots: int | None) -> int:
    """`moe_triton._grouped_gemm`: each row block reads its expert's weights (once per distinct expert:
    blocks of one expert share them through L2), the rows in use are read and written once. An upper
    bound for routed experts: idle blocks (past the rows in use) read nothing."""
    w, s = a["w_ptr"], a["s_ptr"]  # [E, N, .] stacks
    per_expert = (_nbytes(w) + (_nbytes(s) if a["NF4"] else 0)) // w.shape[0]
    experts = min(grid[0], w.shape[0])
    rows = min(grid[0] * a["BLOCK_M"], a["n_rows"])
    return (
        (2 if a["GATED"] else 1) * experts * per_expert
        + rows * a["a_ptr"].shape[-1] * a["a_ptr"].element_size()
        + rows * a["N"] * a["out_ptr"].element_size()
    )


# Bytes models of our Triton kernels, by kernel name: (bound arguments, grid, cache slots in use) -> bytes.
TRITON_BYTES: dict[str, Callable[[dict[str, Any], tuple[int, ...], int | None], int]] = {
    "_grouped_gemm": _grouped_gemm_bytes,
    **DECODE_BYTES,
}


# A CPU-only torch has no CUDA device guard, and Python indexing of a (fake) CUDA tensor needs one:
# this registers the no-op guard that torch itself installs for a CUDA build without devices.
_GUARD_SOURCE = """#include <c10/core/impl/DeviceGuardImplInterface.h>
C10_REGISTER_GUARD_IMPL(CUDA, c10::impl::NoOpDeviceGuardImpl<c10::DeviceType::CUDA>);
"""


class TraceUnavailable(RuntimeError):
    """This machine cannot trace CUDA code (a CPU-only torch and no C++ compiler)."""


def _ensure_cuda_guard() -> None:
    if torch.backends.cuda.is_built():
        return
    compiler = shutil.which("c++") or shutil.which("g++")
    if compiler is None:
        raise TraceUnavailable("a CPU-only torch needs a C++ compiler to trace CUDA code (none found)")
    torch_dir = Path(torch.__file__).parent
    digest = hashlib.sha256((_GUARD_SOURCE + torch.__version__).encode()).hexdigest()[:16]
    root = Path(os.environ.get("KIMIVL_CACHE", Path.home() / ".cache" / "kimivl")) / "native"
    target = root / f"fake_cuda_guard-{digest}.so"
    if not target.is_file():
        root.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=root) as tmp:
            source, built = Path(tmp, "guard.cpp"), Path(tmp, "guard.so")
            source.write_text(_GUARD_SOURCE)
            cmd = [compiler, "-O1", "-shared", "-fPIC", "-std=c++17", f"-I{torch_dir / 'include'}", str(source),
                   f"-L{torch_dir / 'lib'}", "-lc10", f"-Wl,-rpath,{torch_dir / 'lib'}", "-o", str(built)]  # fmt: skip
            done = subprocess.run(cmd, capture_output=True, text=True)
            if done.returncode:
                raise TraceUnavailable(f"building the CUDA guard shim failed: {done.stderr.strip()[-500:]}")
            built.replace(target)  # atomic: parallel workers never load half a file
    ctypes.CDLL(str(target))


_PREFIX = f"{_PACKAGE}{os.sep}"
_HERE = str(Path(__file__).resolve())
_ORIGINS: dict[Any, str | None] = {}  # code object -> "model/cache.py:attend_shared" (None: not ours)


def _origin(code: Any) -> str | None:
    if code not in _ORIGINS:
        path = code.co_filename
        ours = path.startswith(_PREFIX) and path != _HERE
        name = getattr(code, "co_qualname", code.co_name)
        _ORIGINS[code] = f"{path[len(_PREFIX) :].replace(os.sep, '/')}:{name}" if ours else None
    return _ORIGINS[code]


def _caller() -> str:
    """The innermost frame in kimivl_cli (outside this module): "model/cache.py:attend_shared"."""
    frame = sys._getframe(2)
    while frame is not None:
        where = _origin(frame.f_code)
        if where is not None:
            return where
        frame = frame.f_back
    return "?"


class _Recorder(TorchDispatchMode):
    def __init__(self, trace: CudaTrace) -> None:
        super().__init__()
        self.trace = trace

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = f"aten.{func.__name__.split('.')[0]}"
        if func in _SCALAR_READS:  # fake tensors hold no value: a stand-in lets the trace go on
            self.trace.record("sync" if args[0].is_cuda else "host", name)
            return 0.0 if args[0].is_floating_point() else 0
        if func in SYNC_OPS and any(t.is_cuda for t in _tensors((args, kwargs))):
            self.trace.record("sync", name)
        out = func(*args, **kwargs)
        outs = _tensors(out)
        ins = _tensors((args, kwargs))
        devices = {t.device.type for t in ins + outs}
        if func in (_aten._to_copy.default, _aten.copy_.default) and len(devices) > 1:
            self.trace.record("copy", name, sum(_nbytes(t) for t in outs))
            non_blocking = kwargs.get("non_blocking", len(args) > 2 and args[2])
            if not non_blocking:  # a blocking transfer waits for the stream
                self.trace.record("sync", name)
        elif func in _NO_KERNEL or not outs or func.is_view:
            pass
        elif devices == {"cpu"}:
            self.trace.record("host", name)
        else:
            self.trace.record("launch", name, aten_bytes(func, args, kwargs, out))
        return out


@dataclass
class TritonLaunch:
    """One intercepted Triton launch: the kernel object, its arguments as passed (fake tensors keep
    their dtype and shape), the launch options (num_warps, num_stages) and the grid."""

    kernel: Any
    args: dict[str, Any]
    options: dict[str, Any]
    grid: tuple[int, ...]
    where: str


@dataclass
class CudaTrace:
    """Run code on fake CUDA tensors and record its launches, copies and syncs (see the module doc).

        with CudaTrace() as trace:
            x = torch.randn(4, 8, device="cuda")   # a fake tensor: no memory, no data
            trace.reset()
            y = model(x)
        trace.count("launch"), trace.count("sync"), trace.bytes()

    Tensors made inside are only valid inside. Triton kernels are recorded, never run.
    """

    events: list[Event] = field(default_factory=list)
    triton_launches: list[TritonLaunch] = field(default_factory=list)
    slots: int | None = None  # cache slots in use: the bytes of kernels that attend up to a device position

    def record(self, kind: str, kernel: str, nbytes: int = 0) -> None:
        self.events.append(Event(kind, kernel, _caller(), nbytes))

    def reset(self) -> None:
        self.events.clear()
        self.triton_launches.clear()

    def count(self, kind: str = "launch") -> int:
        return sum(e.kind == kind for e in self.events)

    def bytes(self, where: str = "") -> int:
        """Bytes moved by the launches whose origin contains `where` (all launches by default)."""
        return sum(e.bytes for e in self.events if e.kind == "launch" and where in e.where)

    def by(self, key: str = "kernel", kind: str = "launch") -> Counter[str]:
        """Launches (or copies, syncs) per kernel name (key="kernel") or per origin (key="where")."""
        return Counter(getattr(e, key) for e in self.events if e.kind == kind)

    def summary(self) -> dict[str, Any]:
        """Totals and the per-kernel table, JSON-ready."""
        per_kernel: dict[str, dict[str, int]] = {}
        for e in self.events:
            if e.kind == "launch":
                row = per_kernel.setdefault(e.kernel, {"launches": 0, "bytes": 0})
                row["launches"] += 1
                row["bytes"] += e.bytes
        return {
            "launches": self.count("launch"),
            "bytes": self.bytes(),
            "copies": self.count("copy"),
            "syncs": self.count("sync"),
            "sync_sites": sorted(set(self.by("where", "sync")) | set(self.by("where", "copy"))),
            "per_kernel": dict(sorted(per_kernel.items(), key=lambda kv: -kv[1]["bytes"])),
        }

    def _triton_launch(self, kernel: Any, grid: Any, args: tuple, kwargs: dict) -> None:
        fn = kernel.fn
        params = inspect.signature(fn).parameters
        options = {k: v for k, v in kwargs.items() if k not in params}
        bound = inspect.signature(fn).bind(*args, **{k: v for k, v in kwargs.items() if k in params}).arguments
        grid = grid(bound) if callable(grid) else grid
        grid = tuple(int(g) for g in grid)
        model = TRITON_BYTES.get(fn.__name__)
        nbytes = model(bound, grid, self.slots) if model else sum(_nbytes(t) for t in _tensors(bound))
        self.record("launch", f"triton.{fn.__name__}", nbytes)
        self.triton_launches.append(TritonLaunch(kernel, dict(bound), options, grid, self.events[-1].where))

    @contextmanager
    def _watched_host_data(self) -> Iterator[None]:
        """`torch.tensor(data, device="cuda")` copies host data to the device and waits for the copy
        (a pageable, blocking transfer), under inference mode below the dispatcher, where
        `_Recorder` cannot see it."""
        originals = {name: getattr(torch, name) for name in ("tensor", "as_tensor", "asarray")}

        def watched(name: str, make: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
            def make_and_record(data: Any, *args: Any, **kwargs: Any) -> torch.Tensor:
                seen = self.count("copy")
                out = make(data, *args, **kwargs)
                if out.is_cuda and not isinstance(data, torch.Tensor) and self.count("copy") == seen:
                    self.record("copy", f"torch.{name}", _nbytes(out))
                    self.record("sync", f"torch.{name}")
                return out

            return make_and_record

        for name, make in originals.items():
            setattr(torch, name, watched(name, make))
        try:
            yield
        finally:
            for name, make in originals.items():
                setattr(torch, name, make)

    @contextmanager
    def _patched_triton(self) -> Iterator[None]:
        try:
            from triton.runtime.jit import KernelInterface
        except ImportError:  # no Triton: nothing to intercept
            yield
            return
        original = KernelInterface.__getitem__

        def launch(kernel, grid):
            return lambda *args, **kwargs: self._triton_launch(kernel, grid, args, kwargs)

        KernelInterface.__getitem__ = launch
        try:
            yield
        finally:
            KernelInterface.__getitem__ = original

    def __enter__(self) -> CudaTrace:
        _ensure_cuda_guard()
        self._stack = [
            FakeTensorMode(allow_non_fake_inputs=True, shape_env=ShapeEnv()),  # shapes may depend on data
            _Recorder(self),
            self._watched_host_data(),
            self._patched_triton(),
        ]
        for ctx in self._stack:
            ctx.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        for ctx in reversed(self._stack):
            ctx.__exit__(*exc)


def fake_engine(quant: str = "nf4", config: KimiVLConfig | None = None, dtype: torch.dtype = torch.bfloat16) -> Engine:
    """The engine over a Kimi-VL model (full size by default) on fake CUDA tensors: call inside a
    `CudaTrace`. quant: "nf4" | "int8" | "none", as `--quant` loads it."""
    cfg = config or KimiVLConfig()
    with torch.device("meta"):
        model = KimiVL(cfg)
    quantize_linears_(model.language_model, quant, device="meta")
    materialize(model, dtype, "cuda")
    return Engine(model.eval(), cfg)


def decode_trace(
    quant: str, position: int, max_new_tokens: int, config: KimiVLConfig | None = None, fused: bool = True
) -> CudaTrace:
    """One batch-1 decode step at `position` as the engine replays it from a CUDA graph, for a request
    of `position` prompt tokens and `max_new_tokens` new ones (its cache and attention buckets).
    `fused=False`: the module path the engine takes when the fused decode kernels do not apply.

    A first step runs untraced, as the graph's warm-up does (lazy weight splits happen there).
    """
    with CudaTrace(slots=position + 1) as trace, torch.inference_mode():
        engine = fake_engine(quant, config)
        if not fused:
            engine.fused_decode = None
        text = engine.config.text
        capacity = cache_bucket(position + max_new_tokens, text.max_position_embeddings)
        cache = LatentCache(text, 1, capacity, engine.dtype, engine.device)
        kv_len = attention_bucket(position + 1, capacity)
        tokens = torch.zeros(1, 1, dtype=torch.long, device="cuda")
        positions = torch.full((1, 1), position, device="cuda")
        engine.decode_step(tokens, positions, cache, kv_len)
        trace.reset()
        engine.decode_step(tokens, positions, cache, kv_len)
    return trace
