"""The NF4 CPU kernels (`nf4_gemv.c`), compiled on first use and loaded with ctypes.

Why native: at a few tokens the CPU MoE is bound by decoding weights. Any torch formulation
(dequantise to fp32 then GEMV) writes and rereads 4 bytes per weight (~6 ms per 1408x2048
expert matrix here); the C kernels read the 0.56-byte codes once.

Two entry points over them (times: one 1408x2048 matrix, 2 AVX2 cores, weights in cache):
- `nf4_gemv(x, packed, absmax)`: exact fp32 for a few rows (same sums as dequantise-then-matmul,
  another order; ~0.3 ms); `nf4_gemv(..., int8=True)` for one row, the int8-activation dot
  (~0.07 ms; 0.84% of the output norm off the exact result).
- `nf4_moe_decode(...)`: a whole routed-expert step for one token (gate, up, SiLU·mul, down,
  routing weights, sum over experts) in one native call, instead of three GEMVs per expert.

Built with the system C compiler (`cc`, AVX2+FMA when /proc/cpuinfo has them) into
$KIMIVL_CACHE (default ~/.cache/kimivl)/native, keyed by a digest of source and flags; the
build is written to a temporary name and renamed, so parallel processes never load half a
file. No compiler, a failed build or KIMIVL_NATIVE=0: `available()` is False and callers
keep their torch path. Threads: OpenMP inside the C (torch's own libgomp.so.1, loaded first,
so torch's warm thread team and `torch.set_num_threads` apply; no Python thread pool: waking
one cost ~0.1 ms per call here, as much as a whole 1408x2048 GEMV).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

_SOURCE = Path(__file__).with_name("nf4_gemv.c")

_P, _I64 = ctypes.c_void_p, ctypes.c_int64
_SIGNATURES = {  # name: (restype, argtypes)
    "nf4_gemv": (None, [_P] * 5 + [_I64] * 3),
    "nf4_q8_gemv": (ctypes.c_int, [_P] * 4 + [_I64] * 2),
    "nf4_moe_decode": (ctypes.c_int, [_P] * 3 + [_I64] + [_P] * 6 + [_I64] * 2 + [_P]),
}


def _cpu_flags() -> set[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def build(simd: bool = True) -> ctypes.CDLL | None:
    """Compile (once per source and flags) and load the kernels; None without a working compiler.

    OpenMP if the compiler has it (else one thread). `simd=False` builds the portable scalar
    loops even on an AVX2 machine (tests compare both).
    """
    flags = ["-O3", "-shared", "-fPIC", "-fno-math-errno"]
    if simd and {"avx2", "fma"} <= _cpu_flags():
        flags += ["-mavx2", "-mfma"]
    for extra in (["-fopenmp"], []):
        lib = _compile_and_load([*flags, *extra])
        if lib is not None:
            return lib
    return None


def _compile_and_load(flags: list[str]) -> ctypes.CDLL | None:
    compiler = shutil.which("cc") or shutil.which("gcc")
    if compiler is None or not _SOURCE.is_file():
        return None
    digest = hashlib.sha256(_SOURCE.read_bytes() + " ".join(flags).encode()).hexdigest()[:16]
    root = Path(os.environ.get("KIMIVL_CACHE", Path.home() / ".cache" / "kimivl")) / "native"
    target = root / f"nf4_gemv-{digest}.so"
    try:
        if not target.is_file():
            root.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(suffix=".so", dir=root)
            os.close(fd)
            cmd = [compiler, *flags, str(_SOURCE), "-o", tmp, "-lm"]
            subprocess.run(cmd, check=True, capture_output=True, timeout=120)
            os.replace(tmp, target)
        lib = ctypes.CDLL(str(target))  # torch is loaded: its libgomp.so.1 serves our OpenMP too
    except (OSError, subprocess.SubprocessError):
        return None
    for name, (restype, argtypes) in _SIGNATURES.items():
        fn = getattr(lib, name)
        fn.restype, fn.argtypes = restype, argtypes
    return lib


@functools.cache
def _library() -> ctypes.CDLL | None:
    return None if os.environ.get("KIMIVL_NATIVE", "1") == "0" else build()


def available() -> bool:
    return _library() is not None


def _lib(lib: ctypes.CDLL | None) -> ctypes.CDLL:
    lib = lib or _library()
    if lib is None:
        raise RuntimeError("the native NF4 kernels are not available (see kimivl_cli/kernels/native.py)")
    return lib


def _check(status: int) -> None:
    if status != 0:
        raise MemoryError("the native NF4 kernel could not allocate its scratch buffers")


def nf4_gemv(
    x: torch.Tensor, packed: torch.Tensor, absmax: torch.Tensor, int8: bool = False, lib: ctypes.CDLL | None = None
) -> torch.Tensor:
    """x [T, K] (any float dtype, T small), packed [N, K/2] uint8, absmax [N, K/64] fp32 -> x Wᵀ [T, N] fp32.

    O(T·N·K) work, reads the codes T times: use it for a few rows, dequantise for many. `int8`
    (one row only): the activation quantized to int8 per 64-block and integer block dots.
    """
    lib = _lib(lib)
    n, k = packed.shape[0], packed.shape[1] * 2
    packed, absmax = packed.contiguous(), absmax.contiguous()
    out = torch.empty(x.shape[0], n, dtype=torch.float32)
    xf = x.float()
    if int8:
        if x.shape[0] != 1:
            raise ValueError(f"the int8 NF4 GEMV takes one row, got {x.shape[0]}")
        xf = xf.contiguous()
        _check(lib.nf4_q8_gemv(xf.data_ptr(), packed.data_ptr(), absmax.data_ptr(), out.data_ptr(), n, k))
        return out
    evens, odds = xf[:, 0::2].contiguous(), xf[:, 1::2].contiguous()
    lib.nf4_gemv(
        evens.data_ptr(), odds.data_ptr(), packed.data_ptr(), absmax.data_ptr(), out.data_ptr(), x.shape[0], n, k
    )
    return out


def nf4_moe_decode(
    x: torch.Tensor,
    experts: torch.Tensor,
    route_w: torch.Tensor,
    gate: tuple[torch.Tensor, torch.Tensor],
    up: tuple[torch.Tensor, torch.Tensor],
    down: tuple[torch.Tensor, torch.Tensor],
    lib: ctypes.CDLL | None = None,
) -> torch.Tensor:
    """One token's routed experts: sum_a route_w[a] · down_e(silu(gate_e x) · up_e x), e = experts[a].

    x [H]; experts [A] int64 and route_w [A] (A active experts); stacked NF4 weights
    gate/up ([E, I, H/2], [E, I, H/64]), down ([E, H, I/2], [E, H, I/64]) -> [H] fp32.
    int8 activations (x, then h) as in `nf4_gemv(int8=True)`; one native call (two threaded
    phases: gate/up over 64-row blocks of I, then down over rows of H); scratch A·I bytes.
    """
    lib = _lib(lib)
    hidden, inter = x.shape[0], gate[0].shape[1]
    xf, ids, rw = x.float().contiguous(), experts.to(torch.int64).contiguous(), route_w.float().contiguous()
    weights = [t.contiguous().data_ptr() for t in (*gate, *up, *down)]
    out = torch.empty(hidden, dtype=torch.float32)
    _check(lib.nf4_moe_decode(xf.data_ptr(), ids.data_ptr(), rw.data_ptr(), ids.shape[0], *weights, hidden, inter,
                              out.data_ptr()))  # fmt: skip
    return out
