"""The CPU kernels (`cpu_kernels.c`): one build per instruction set, compiled on first use, loaded with ctypes.

Why native: at a few tokens the CPU model is bound by reading weights. Any torch formulation of an NF4
product (dequantise to fp32, then GEMM) writes and rereads 4 bytes per weight; these kernels read the
0.56-byte codes once, and a whole routed-expert step is one call instead of dozens of small ops.

Variants (`VARIANTS`, widest first): amx, avx512_bf16, avx512_vnni, avx2, neon_dotprod, scalar. A
variant is a candidate when the CPU has its features (`kernels/cpu.py`, which also honours
KIMIVL_CPU_OFF) and it compiles; `cpu.plan()` times the candidates once per machine and picks one. KIMIVL_NATIVE=0 turns every native
kernel off (callers keep their torch paths).

Built with the system C compiler into $KIMIVL_CACHE (default ~/.cache/kimivl)/native, keyed by a digest
of source and flags; each build is written to a temporary name and renamed, so parallel processes never
load half a file. OpenMP inside the C uses torch's own libgomp.so.1 (loaded first), so torch's warm thread
team and `torch.set_num_threads` apply.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import shutil
import subprocess
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch

_SOURCE = Path(__file__).with_name("cpu_kernels.c")
_SOURCES = (_SOURCE, _SOURCE.with_name("cpu_decode.c"))  # the second is #included by the first

# name: (CPU features it needs, compiler flags)
_AVX512_BF16 = ("-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512vnni", "-mavx512bf16", "-mavx2", "-mfma")
VARIANTS: dict[str, tuple[frozenset[str], tuple[str, ...]]] = {
    "amx": (
        frozenset(
            {"avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_bf16", "avx2", "fma"}
        ),
        (*_AVX512_BF16, "-mamx-tile", "-mamx-bf16"),
    ),
    "avx512_bf16": (
        frozenset({"avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx512_bf16", "avx2", "fma"}),
        _AVX512_BF16,
    ),
    "avx512_vnni": (
        frozenset({"avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx2", "fma"}),
        ("-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512vnni", "-mavx2", "-mfma"),
    ),
    "avx2": (frozenset({"avx2", "fma"}), ("-mavx2", "-mfma")),
    "neon_dotprod": (frozenset({"asimddp"}), ("-march=armv8.2-a+dotprod",)),
    "scalar": (frozenset(), ()),
}

_P, _I64 = ctypes.c_void_p, ctypes.c_int64
_SIGNATURES = {  # name: (restype, argtypes)
    "kimivl_variant": (ctypes.c_char_p, []),
    "nf4_q8_matmul": (ctypes.c_int, [_P] * 4 + [_I64] * 3),
    "q8_q8_matmul": (ctypes.c_int, [_P] * 4 + [_I64] * 3),
    "nf4_dequantize": (None, [_P] * 3 + [_I64] * 2 + [ctypes.c_int]),
    "nf4_moe": (ctypes.c_int, [_P] * 3 + [_I64] * 3 + [_P] * 6 + [_I64] * 2 + [_P]),
    "nf4_moe_decode": (ctypes.c_int, [_P] * 3 + [_I64] + [_P] * 6 + [_I64] * 2 + [_P]),
    "bf16_matvec": (None, [_P] * 3 + [_I64] * 2),
    "bf16_moe_decode": (ctypes.c_int, [_P] * 3 + [_I64] + [_P] * 3 + [_I64] * 2 + [_P]),
    "bf16_moe": (ctypes.c_int, [_P] * 3 + [_I64] * 3 + [_P] * 3 + [_I64] * 2 + [_P]),
    "nf4_bf16_moe": (ctypes.c_int, [_P] * 3 + [_I64] * 3 + [_P] * 6 + [_I64] * 2 + [_P]),
    "nf4_bf16_matmul": (ctypes.c_int, [_P] * 4 + [_I64] * 3),
    "kimivl_decode": (ctypes.c_int, [_P, _I64, _I64, _P, _I64, _P]),
}


def compile_command(variant: str, compiler: str, output: str, openmp: bool = True) -> list[str]:
    """The command that builds `variant` into the shared library `output` (also used for cross builds)."""
    flags = ["-O3", "-shared", "-fPIC", "-fno-math-errno", *VARIANTS[variant][1]]
    return [compiler, *flags, *(["-fopenmp"] if openmp else []), str(_SOURCE), "-o", output, "-lm"]


@functools.cache
def build(variant: str) -> ctypes.CDLL | None:
    """Compile (once per source and flags) and load `variant`; None without a compiler that builds it.
    OpenMP if the compiler has it, else one thread."""
    compiler = shutil.which("cc") or shutil.which("gcc")
    if compiler is None or not all(path.is_file() for path in _SOURCES):
        return None
    for openmp in (True, False):
        lib = _compile_and_load(compile_command(variant, compiler, "{out}", openmp))
        if lib is not None:
            return lib
    return None


def _compile_and_load(cmd: list[str]) -> ctypes.CDLL | None:
    digest = hashlib.sha256(_source_bytes() + " ".join(cmd).encode()).hexdigest()[:16]
    root = cache_dir() / "native"
    target = root / f"cpu_kernels-{digest}.so"
    try:
        if not target.is_file():
            root.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(suffix=".so", dir=root)
            os.close(fd)
            try:
                subprocess.run([tmp if c == "{out}" else c for c in cmd], check=True, capture_output=True, timeout=180)
                os.replace(tmp, target)
            finally:
                Path(tmp).unlink(missing_ok=True)
        lib = ctypes.CDLL(str(target))  # torch is loaded: its libgomp.so.1 serves our OpenMP too
    except (OSError, subprocess.SubprocessError):
        return None
    for name, (restype, argtypes) in _SIGNATURES.items():
        fn = getattr(lib, name)
        fn.restype, fn.argtypes = restype, argtypes
    return lib


def _source_bytes() -> bytes:
    return b"".join(path.read_bytes() for path in _SOURCES if path.is_file())


def source_digest() -> str:
    return hashlib.sha256(_source_bytes()).hexdigest()[:16] if _SOURCE.is_file() else "none"


def cache_dir() -> Path:
    return Path(os.environ.get("KIMIVL_CACHE", Path.home() / ".cache" / "kimivl"))


def enabled() -> bool:
    return os.environ.get("KIMIVL_NATIVE", "1") != "0"


@functools.cache
def _library() -> ctypes.CDLL | None:
    from kimivl_cli.kernels.cpu import plan  # the plan times this module's builds

    variant = plan().native
    return None if variant is None else build(variant)


def available() -> bool:
    return _library() is not None


def _lib(lib: ctypes.CDLL | None) -> ctypes.CDLL:
    lib = lib or _library()
    if lib is None:
        raise RuntimeError("the native CPU kernels are not available (see kimivl_cli/kernels/native.py)")
    return lib


def _check(status: int) -> None:
    if status != 0:
        raise MemoryError("a native CPU kernel could not allocate its scratch buffers")


def _ptrs(*tensors: torch.Tensor) -> list[int]:
    return [t.data_ptr() for t in tensors]


def _matmul(
    kernel: Callable[..., int], x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor, n: int, k: int
) -> torch.Tensor:
    """Call one of the matrix-product kernels (same argument order): x [T, K] -> [T, N] fp32."""
    out = torch.empty(x.shape[0], n, dtype=torch.float32)
    if x.shape[0]:
        xf, weight, scales = x.float().contiguous(), weight.contiguous(), scales.contiguous()
        _check(kernel(*_ptrs(xf, weight, scales, out), x.shape[0], n, k))
    return out


def q8_matmul(
    x: torch.Tensor, packed: torch.Tensor, absmax: torch.Tensor, lib: ctypes.CDLL | None = None
) -> torch.Tensor:
    """x [T, K] (any float dtype) @ NF4 Wᵀ -> [T, N] fp32, int8 activations (per 64-block).

    packed [N, K/2] uint8, absmax [N, K/64] fp32. Reads the codes once per 64 rows of x.
    """
    return _matmul(_lib(lib).nf4_q8_matmul, x, packed, absmax, packed.shape[0], packed.shape[1] * 2)


def nf4_bf16_matmul(
    x: torch.Tensor, packed: torch.Tensor, absmax: torch.Tensor, lib: ctypes.CDLL | None = None
) -> torch.Tensor:
    """x [T, K] @ NF4 Wᵀ -> [T, N] fp32, W dequantised to bf16 16 rows at a time in cache and multiplied by every
    row of x (AMX tiles where the build has them; x rounded to bf16 where the build multiplies bf16): many rows."""
    return _matmul(_lib(lib).nf4_bf16_matmul, x, packed, absmax, packed.shape[0], packed.shape[1] * 2)


def int8_blocks_matmul(
    x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, lib: ctypes.CDLL | None = None
) -> torch.Tensor:
    """x [T, K] @ Wᵀ -> [T, N] fp32 for W in int8 blocks (`weight_formats.quantize_int8_blocks`: q [N, K] int8,
    scale [N, K/64] fp32), int8 activations per 64-block: integer block sums, one scale per block pair."""
    return _matmul(_lib(lib).q8_q8_matmul, x, q, scale, *q.shape)


def nf4_dequantize(
    packed: torch.Tensor, absmax: torch.Tensor, dtype: torch.dtype = torch.float32, lib: ctypes.CDLL | None = None
) -> torch.Tensor:
    """packed [N, K/2], absmax [N, K/64] -> W [N, K] in fp32 or bf16 (level x absmax, rounded once)."""
    if dtype not in (torch.float32, torch.bfloat16):
        raise ValueError(f"native NF4 dequantisation writes fp32 or bf16, not {dtype}")
    lib = _lib(lib)
    n, k = packed.shape[0], packed.shape[1] * 2
    packed, absmax = packed.contiguous(), absmax.contiguous()
    out = torch.empty(n, k, dtype=dtype)
    lib.nf4_dequantize(*_ptrs(packed, absmax, out), n, k, int(dtype == torch.bfloat16))
    return out


def nf4_moe(
    x: torch.Tensor,
    idx: torch.Tensor,
    route_w: torch.Tensor,
    gate: tuple[torch.Tensor, torch.Tensor],
    up: tuple[torch.Tensor, torch.Tensor],
    down: tuple[torch.Tensor, torch.Tensor],
    lib: ctypes.CDLL | None = None,
) -> torch.Tensor:
    """Routed experts of T tokens: out_t = sum_a route_w[t, a] · down_e(silu(gate_e x_t) · up_e x_t), e = idx[t, a].

    x [T, H]; idx [T, K] and route_w [T, K]; stacked NF4 weights gate/up ([E, I, H/2], [E, I, H/64]),
    down ([E, H, I/2], [E, H, I/64]) -> [T, H] fp32. int8 activations (x, then h); one native call.
    One token takes the decode kernel (all its experts in two threaded phases).
    """
    lib = _lib(lib)
    if x.shape[0] == 1:
        hidden, inter = x.shape[1], gate[0].shape[1]
        out = torch.empty(1, hidden, dtype=torch.float32)
        xf, ids, rw = x.float().contiguous(), idx.to(torch.int64).contiguous(), route_w.float().contiguous()
        weights = _ptrs(*(w.contiguous() for w in (*gate, *up, *down)))
        _check(lib.nf4_moe_decode(*_ptrs(xf, ids, rw), ids.shape[1], *weights, hidden, inter, out.data_ptr()))
        return out
    return _grouped_moe(lib.nf4_moe, x, idx, route_w, [*gate, *up, *down])


def _grouped_moe(
    kernel: Callable[..., int], x: torch.Tensor, idx: torch.Tensor, route_w: torch.Tensor, stacks: list[torch.Tensor]
) -> torch.Tensor:
    """Call one of the grouped routed-expert kernels (same argument order): x [T, H], idx/route_w [T, K],
    `stacks` the gate, up and down tensors as the kernel takes them -> [T, H] fp32."""
    (t, hidden), (n_experts, inter) = x.shape, stacks[0].shape[:2]
    xf, ids, rw = x.float().contiguous(), idx.to(torch.int64).contiguous(), route_w.float().contiguous()
    out = torch.empty(t, hidden, dtype=torch.float32)
    weights = _ptrs(*(w.contiguous() for w in stacks))
    _check(kernel(*_ptrs(xf, ids, rw), t, ids.shape[1], n_experts, *weights, hidden, inter, out.data_ptr()))
    return out


def nf4_bf16_moe(
    x: torch.Tensor,
    idx: torch.Tensor,
    route_w: torch.Tensor,
    gate: tuple[torch.Tensor, torch.Tensor],
    up: tuple[torch.Tensor, torch.Tensor],
    down: tuple[torch.Tensor, torch.Tensor],
    lib: ctypes.CDLL | None = None,
) -> torch.Tensor:
    """`nf4_moe`'s contract, each expert's NF4 weights dequantised to bf16 16 rows at a time (in cache) and
    multiplied as in `bf16_moe` (AMX tiles where the build has them): many rows per expert."""
    return _grouped_moe(_lib(lib).nf4_bf16_moe, x, idx, route_w, [*gate, *up, *down])


def bf16_matvec(x: torch.Tensor, weight: torch.Tensor, lib: ctypes.CDLL | None = None) -> torch.Tensor:
    """x [K] (any float dtype) @ W [N, K] bf16 ᵀ -> [N] fp32, fp32 sums (one token's linear)."""
    lib = _lib(lib)
    n, k = weight.shape
    xf, weight = x.float().contiguous(), weight.contiguous()
    out = torch.empty(n, dtype=torch.float32)
    lib.bf16_matvec(*_ptrs(xf, weight, out), n, k)
    return out


def bf16_moe_decode(
    x: torch.Tensor,
    experts: torch.Tensor,
    route_w: torch.Tensor,
    gate: torch.Tensor,
    up: torch.Tensor,
    down: torch.Tensor,
    lib: ctypes.CDLL | None = None,
) -> torch.Tensor:
    """One token's experts with bf16 weights, fp32 math: x [H], experts [A], route_w [A], gate/up [E, I, H],
    down [E, H, I] -> sum_a route_w[a] · down_e(silu(gate_e x) · up_e x) [H] fp32."""
    lib = _lib(lib)
    hidden, inter = x.shape[0], gate.shape[1]
    xf, ids, rw = x.float().contiguous(), experts.to(torch.int64).contiguous(), route_w.float().contiguous()
    out = torch.empty(hidden, dtype=torch.float32)
    weights = _ptrs(*(w.contiguous() for w in (gate, up, down)))
    _check(lib.bf16_moe_decode(*_ptrs(xf, ids, rw), ids.shape[0], *weights, hidden, inter, out.data_ptr()))
    return out


def bf16_moe(
    x: torch.Tensor,
    idx: torch.Tensor,
    route_w: torch.Tensor,
    gate: torch.Tensor,
    up: torch.Tensor,
    down: torch.Tensor,
    lib: ctypes.CDLL | None = None,
) -> torch.Tensor:
    """Routed experts of T tokens with bf16 weights, fp32 math: x [T, H], idx/route_w [T, K], gate/up
    [E, I, H], down [E, H, I] -> [T, H] fp32. One call; each active expert's weights are read once."""
    return _grouped_moe(_lib(lib).bf16_moe, x, idx, route_w, [gate, up, down])


def decode_step(
    model: int, token: int, pos: int, cache: int, layer_stride: int, logits: int, lib: ctypes.CDLL | None = None
) -> int:
    """One token through a whole model described by `engine/cpu_decode.py` (addresses, not tensors: the
    description is built once and the caller keeps its tensors alive). Returns the C status (0: done)."""
    return _lib(lib).kimivl_decode(model, token, pos, cache, layer_stride, logits)
