"""The NF4 GEMV for CPU decode (`nf4_gemv.c`), compiled on first use and loaded with ctypes.

Why native: at a few tokens the CPU MoE is bound by decoding weights. Any torch formulation
(dequantise to fp32 then GEMV) writes and rereads 4 bytes per weight (~6 ms per 1408x2048
expert matrix here); the C kernel reads the 0.56-byte codes once (~0.7 ms on one AVX2 core).

Built with the system C compiler (`cc`, AVX2+FMA when /proc/cpuinfo has them) into
$KIMIVL_CACHE (default ~/.cache/kimivl)/native, keyed by a digest of source and flags; the
build is written to a temporary name and renamed, so parallel processes never load half a
file. No compiler, a failed build or KIMIVL_NATIVE=0: `available()` is False and callers
keep their torch path. Rows are split across torch's intra-op thread count with a thread pool
(ctypes releases the GIL during the call).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import shutil
import subprocess
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

_SOURCE = Path(__file__).with_name("nf4_gemv.c")


def _cpu_flags() -> set[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


@functools.cache
def _library() -> ctypes.CDLL | None:
    if os.environ.get("KIMIVL_NATIVE", "1") == "0":
        return None
    compiler = shutil.which("cc") or shutil.which("gcc")
    if compiler is None or not _SOURCE.is_file():
        return None
    flags = ["-O3", "-shared", "-fPIC"] + (["-mavx2", "-mfma"] if {"avx2", "fma"} <= _cpu_flags() else [])
    digest = hashlib.sha256(_SOURCE.read_bytes() + " ".join(flags).encode()).hexdigest()[:16]
    root = Path(os.environ.get("KIMIVL_CACHE", Path.home() / ".cache" / "kimivl")) / "native"
    target = root / f"nf4_gemv-{digest}.so"
    try:
        if not target.is_file():
            root.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(suffix=".so", dir=root)
            os.close(fd)
            subprocess.run([compiler, *flags, str(_SOURCE), "-o", tmp], check=True, capture_output=True, timeout=120)
            os.replace(tmp, target)
        lib = ctypes.CDLL(str(target))
    except (OSError, subprocess.SubprocessError):
        return None
    lib.nf4_gemv_rows.restype = None
    lib.nf4_gemv_rows.argtypes = [ctypes.c_void_p] * 5 + [ctypes.c_int64] * 3
    return lib


def available() -> bool:
    return _library() is not None


@functools.cache
def _pool(workers: int) -> ThreadPoolExecutor:
    return ThreadPoolExecutor(workers, thread_name_prefix="kimivl-nf4")


def nf4_gemv(x: torch.Tensor, packed: torch.Tensor, absmax: torch.Tensor) -> torch.Tensor:
    """x [T, K] (any float dtype, T small), packed [N, K/2] uint8, absmax [N, K/64] fp32 -> x Wᵀ [T, N] fp32.

    O(T·N·K) work, reads the codes T times: use it for a few rows, dequantise for many.
    """
    lib = _library()
    if lib is None:
        raise RuntimeError("the native NF4 kernel is not available (see kimivl_cli/kernels/native.py)")
    n, k = packed.shape[0], packed.shape[1] * 2
    packed, absmax = packed.contiguous(), absmax.contiguous()
    xf = x.float()
    evens, odds = xf[:, 0::2].contiguous(), xf[:, 1::2].contiguous()
    out = torch.empty(x.shape[0], n, dtype=torch.float32)
    workers = max(1, min(torch.get_num_threads(), n // 256))
    step = -(-n // workers)
    jobs = []
    for t in range(x.shape[0]):
        args = [evens[t].data_ptr(), odds[t].data_ptr(), packed.data_ptr(), absmax.data_ptr(), out[t].data_ptr()]
        for n0 in range(0, n, step):
            if workers == 1:
                lib.nf4_gemv_rows(*args, n0, min(n, n0 + step), k)
            else:
                jobs.append(_pool(workers).submit(lib.nf4_gemv_rows, *args, n0, min(n, n0 + step), k))
    for job in jobs:
        job.result()
    return out
