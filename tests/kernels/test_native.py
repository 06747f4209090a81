"""The native CPU kernels (`kernels/cpu_kernels.c`): every build this machine can run, against PyTorch.

- each variant reports the instruction set its build took (so a test of "avx512_vnni" runs that code);
- int8-activation products (NF4 and int8-block weights) and the MoE steps against a torch model of their
  integer math (tight: each kernel computes what it claims) and against the exact product (the error bound);
- bf16 GEMV, expert step and grouped experts against fp32 torch; dequantisation bit for bit;
- an aarch64 build with NEON dot products, cross-compiled, equals the scalar build here (run under
  qemu-user where installed, else compiled only);
- every thread count gives identical bits; KIMIVL_CPU_OFF takes variants out of the plan.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from kimivl_cli.kernels import cpu, native
from kimivl_cli.kernels.reference import fused_moe_reference
from kimivl_cli.weight_formats import (
    BLOCKSIZE,
    NF4Tensor,
    dequantize_int8_blocks,
    dequantize_nf4,
    nf4_code,
    quantize_int8_blocks,
    quantize_nf4,
)

pytestmark = pytest.mark.skipif(not native.available(), reason="no C compiler: the torch paths serve instead")


@pytest.fixture(params=list(native.VARIANTS))
def lib(request):
    """One build per variant this CPU runs (and KIMIVL_CPU_OFF leaves in)."""
    if request.param not in cpu.native_candidates():
        pytest.skip(f"this CPU does not run {request.param} (or KIMIVL_CPU_OFF takes it out)")
    built = native.build(request.param)
    assert built is not None, f"{request.param} does not compile"
    assert built.kimivl_variant().decode() == request.param  # the build took that instruction set's path
    return built


def _rel(got: torch.Tensor, ref: torch.Tensor) -> float:
    return float((got - ref).norm() / ref.norm())


def _nf4(*shape: int, seed: int = 0, std: float = 0.02) -> NF4Tensor:
    return quantize_nf4(torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * std)


def _dense(q: NF4Tensor) -> torch.Tensor:
    return dequantize_nf4(NF4Tensor(q.packed, q.absmax, torch.float32))


# ---------------------------------------------------------------- a torch model of the int8 math


def _q8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [K] -> integer values [K/64, 64] (round half to even, as lrintf) and block scales [K/64]."""
    blocks = x.float().view(-1, BLOCKSIZE)
    amax = blocks.abs().amax(1)
    inv = torch.where(amax > 0, 127 / amax, torch.zeros_like(amax))
    return (blocks * inv[:, None]).round(), amax / 127


def _int_model(x: torch.Tensor, levels: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """x [T, K], integer weights [N, K] with block scales [N, K/64] -> sum of exact integer block dots, scaled."""
    n, k = levels.shape
    w = levels.view(n, k // BLOCKSIZE, BLOCKSIZE)
    rows = []
    for row in x:
        xq, s = _q8(row)
        rows.append(((w * xq).sum(-1) * scales * s).sum(-1))  # exact in fp32: |block sum| < 2**24
    return torch.stack(rows)


def _nf4_model(x: torch.Tensor, q: NF4Tensor) -> torch.Tensor:
    n, k = q.packed.shape[0], q.packed.shape[1] * 2
    codes = torch.stack([q.packed >> 4, q.packed & 15], -1).view(n, k).long()
    return _int_model(x, (nf4_code() * 127).round()[codes], q.absmax) / 127


def _moe_model(x, idx, route_w, gate, up, down) -> torch.Tensor:
    out = torch.zeros(x.shape)
    for t in range(x.shape[0]):
        for e, w in zip(idx[t].tolist(), route_w[t].tolist(), strict=True):
            g, u = (_nf4_model(x[t : t + 1], NF4Tensor(m.packed[e], m.absmax[e], torch.float32)) for m in (gate, up))
            out[t] += w * _nf4_model(F.silu(g) * u, NF4Tensor(down.packed[e], down.absmax[e], torch.float32))[0]
    return out


# ---------------------------------------------------------------- NF4 and int8-block products


@pytest.mark.parametrize(("m", "n", "k"), [(1, 1408, 2048), (1, 7, 64), (3, 101, 128), (9, 13, 192), (70, 37, 128)])
def test_nf4_product_computes_its_integer_model(lib, m: int, n: int, k: int) -> None:
    """Row counts off the 4x4 tiles, the 64-row chunks and the thread split; a zero block (scale 0)."""
    q = _nf4(n, k, seed=k)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(n))
    if k > BLOCKSIZE:
        x[0, :BLOCKSIZE] = 0
    got = native.q8_matmul(x, q.packed, q.absmax, lib=lib)
    assert got.dtype == torch.float32 and got.shape == (m, n)
    ref = _nf4_model(x, q)
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-5 * float(ref.abs().max()))  # another rounding order
    assert _rel(got, x @ _dense(q).t()) < 2e-2  # the int8 rounding of x: ~0.8%, against ~10% for NF4


@pytest.mark.parametrize(("m", "n", "k"), [(1, 300, 256), (6, 33, 128)])
def test_int8_block_product_computes_its_integer_model(lib, m: int, n: int, k: int) -> None:
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(m))
    t = quantize_int8_blocks(w)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(k))
    got = native.int8_blocks_matmul(x, t.q, t.scale, lib=lib)
    levels = dequantize_int8_blocks(type(t)(t.q, torch.ones_like(t.scale)))  # the integers, natural order
    ref = _int_model(x, levels, t.scale)
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-5 * float(ref.abs().max()))  # another rounding order
    assert _rel(got, x @ dequantize_int8_blocks(t).t()) < 1e-2


def test_int8_blocks_round_trip() -> None:
    w = torch.randn(40, 192)
    t = quantize_int8_blocks(w)
    assert t.q.shape == w.shape and t.scale.shape == (40, 3)
    assert _rel(dequantize_int8_blocks(t), w) < 1e-2
    assert torch.equal(t.q[0, :32], torch.round(w[0, 0:64:2] / t.scale[0, 0]).to(torch.int8))  # evens first


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dequantize_is_bit_exact(lib, dtype: torch.dtype) -> None:
    q = _nf4(37, 192, std=1.0)
    assert torch.equal(native.nf4_dequantize(q.packed, q.absmax, dtype, lib=lib), _dense(q).to(dtype))


# ---------------------------------------------------------------- MoE steps


def _experts(e: int, h: int, i: int) -> tuple[NF4Tensor, NF4Tensor, NF4Tensor]:
    return _nf4(e, i, h, seed=1, std=0.05), _nf4(e, i, h, seed=2, std=0.05), _nf4(e, h, i, seed=3, std=0.05)


@pytest.mark.parametrize(("tokens", "active"), [(1, 1), (1, 3), (1, 6), (2, 3), (11, 2)])
def test_moe_computes_its_integer_model(lib, tokens: int, active: int) -> None:
    """One token: the decode kernel (odd expert counts: the unpaired expert); more: the grouped one."""
    gate, up, down = _experts(8, 256, 192)
    gen = torch.Generator().manual_seed(active)
    x = torch.randn(tokens, 256, generator=gen)
    idx = torch.stack([torch.randperm(8, generator=gen)[:active] for _ in range(tokens)])
    w = torch.rand(tokens, active, generator=gen)
    got = native.nf4_moe(x, idx, w, *[(t.packed, t.absmax) for t in (gate, up, down)], lib=lib)
    assert _rel(got, _moe_model(x, idx, w, gate, up, down)) < 1e-5
    exact = fused_moe_reference(x, idx, w, *[_dense(t) for t in (gate, up, down)])
    assert _rel(got, exact) < 3e-2  # three int8 products, two activation roundings; NF4 itself: ~15%


def test_bf16_products_against_fp32(lib) -> None:
    gen = torch.Generator().manual_seed(0)
    w, x = torch.randn(37, 200, generator=gen).bfloat16(), torch.randn(200, generator=gen)
    torch.testing.assert_close(native.bf16_matvec(x, w, lib=lib), w.float() @ x, rtol=1e-5, atol=1e-5)
    gate, up = (torch.randn(8, 66, 128, generator=gen).bfloat16() * 0.1 for _ in range(2))  # 66: ragged row tiles
    down = torch.randn(8, 128, 66, generator=gen).bfloat16() * 0.1
    x, ids, rw = torch.randn(128, generator=gen), torch.tensor([3, 1, 6]), torch.rand(3, generator=gen)
    got = native.bf16_moe_decode(x, ids, rw, gate, up, down, lib=lib)
    ref = fused_moe_reference(x[None], ids[None], rw[None], gate.float(), up.float(), down.float())[0]
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(
    ("tokens", "n_experts", "hidden", "inter"),
    [(5, 8, 128, 64), (120, 3, 128, 96), (9, 4, 80, 66)],  # few rows; 80 rows per expert (5 AMX tiles); ragged
)
def test_bf16_grouped_experts_against_fp32(lib, tokens: int, n_experts: int, hidden: int, inter: int) -> None:
    """Many tokens' experts with bf16 stacks in one call: fp32 sums; builds with bf16 dot products (AMX,
    AVX512_BF16) round x and h to bf16 as a bf16 model's own GEMMs do, so they get that rounding's bound."""
    gen = torch.Generator().manual_seed(tokens)
    gate, up = (torch.randn(n_experts, inter, hidden, generator=gen).bfloat16() * 0.1 for _ in range(2))
    down = torch.randn(n_experts, hidden, inter, generator=gen).bfloat16() * 0.1
    x = torch.randn(tokens, hidden, generator=gen).bfloat16()
    idx = torch.stack([torch.randperm(n_experts, generator=gen)[:2] for _ in range(tokens)])
    rw = torch.rand(tokens, 2, generator=gen)
    got = native.bf16_moe(x, idx, rw, gate, up, down, lib=lib)
    ref = fused_moe_reference(x.float(), idx, rw, gate.float(), up.float(), down.float())
    bf16_dot = lib.kimivl_variant().decode() in ("amx", "avx512_bf16")
    assert _rel(got, ref) < (4e-3 if bf16_dot else 1e-6)
    if bf16_dot:  # exactly the products of bf16 activations: x is bf16 already, h is rounded once
        h = F.silu(torch.einsum("td,eid->tei", x.float(), gate.float())) * torch.einsum(
            "td,eid->tei", x.float(), up.float()
        )
        y = torch.einsum("tei,edi->ted", h.bfloat16().float(), down.float())  # [T, E, D]
        want = (y.gather(1, idx[..., None].expand(-1, -1, hidden)) * rw[..., None]).sum(1)
        assert _rel(got, want) < 1e-5


def test_nf4_grouped_experts_are_bf16_tiles_of_the_dequantised_weights(lib) -> None:
    """nf4_bf16_moe dequantises 16 rows at a time (to bf16, as nf4_dequantize) and multiplies like bf16_moe:
    the same bits as bf16_moe on the whole dequantised stacks (~80 rows per expert: 5 AMX tiles of 16)."""
    gate, up, down = _experts(4, 128, 192)
    gen = torch.Generator().manual_seed(3)
    x, idx = (
        torch.randn(160, 128, generator=gen),
        torch.stack([torch.randperm(4, generator=gen)[:2] for _ in range(160)]),
    )
    rw = torch.rand(160, 2, generator=gen)
    got = native.nf4_bf16_moe(x, idx, rw, *[(t.packed, t.absmax) for t in (gate, up, down)], lib=lib)
    stacks = [
        native.nf4_dequantize(t.packed.flatten(0, 1), t.absmax.flatten(0, 1), torch.bfloat16, lib=lib)
        for t in (gate, up, down)
    ]
    stacks = [s.view(4, -1, s.shape[-1]) for s in stacks]
    assert torch.equal(got, native.bf16_moe(x, idx, rw, *stacks, lib=lib))


@pytest.mark.parametrize(("m", "n", "k"), [(1, 48, 128), (5, 40, 192), (70, 96, 2048), (130, 32, 64), (17, 13, 128)])
def test_nf4_bf16_product_is_the_dequantised_weights_times_bf16_rows(lib, m: int, n: int, k: int) -> None:
    """nf4_bf16_matmul: 16 weight rows at a time dequantised to bf16 (as nf4_dequantize) times every row of x,
    fp32 sums; builds that multiply bf16 (AMX, AVX512_BF16) round x to bf16 first. Shapes: one row, rows past
    one and several 64-row AMX passes, weight rows not a multiple of 16 (no AMX tiles), k of one block."""
    q = _nf4(n, k, seed=m)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(n))
    got = native.nf4_bf16_matmul(x, q.packed, q.absmax, lib=lib)
    w = native.nf4_dequantize(q.packed, q.absmax, torch.bfloat16, lib=lib).float()
    rows = x.bfloat16().float() if lib.kimivl_variant().decode() in ("amx", "avx512_bf16") else x
    torch.testing.assert_close(got, rows @ w.T, rtol=1e-5, atol=1e-5 * float((rows @ w.T).abs().max()))
    assert native.nf4_bf16_matmul(x[:0], q.packed, q.absmax, lib=lib).shape == (0, n)


# ---------------------------------------------------------------- builds, threads, switches


def test_thread_counts_agree_and_share_one_openmp_runtime() -> None:
    """Each output is computed whole by one thread: 1 or 2 threads give identical bits. The kernels use
    torch's libgomp (one OpenMP runtime in the process, not two competing thread teams)."""
    q = _nf4(1001, 1024)
    gate, up, down = _experts(8, 256, 192)
    x, idx, w = torch.randn(5, 1024), torch.randint(0, 8, (5, 1)), torch.rand(5, 1)
    threads = torch.get_num_threads()
    runs = []
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            moe = native.nf4_moe(x[:, :256], idx, w, *[(t.packed, t.absmax) for t in (gate, up, down)])
            bf16 = native.bf16_moe(x[:, :256], idx, w, *(_dense(t).bfloat16() for t in (gate, up, down)))
            tiles = native.nf4_bf16_matmul(x[:, :1024], q.packed, q.absmax)
            runs.append((native.q8_matmul(x, q.packed, q.absmax), moe, bf16, tiles))
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(a, b) for a, b in zip(*runs, strict=True))
    with open("/proc/self/maps") as maps:
        assert len({line.split()[-1] for line in maps if "libgomp" in line}) <= 1


def _driver_inputs(path: Path) -> dict[str, torch.Tensor]:
    m, n, k, e, h, i, a = 3, 24, 128, 4, 128, 64, 2
    gen = torch.Generator().manual_seed(5)
    q = _nf4(n, k)
    t = quantize_int8_blocks(torch.randn(n, k, generator=gen))
    gate, up, down = _experts(e, h, i)
    arrays = {
        "x": torch.randn(m, k, generator=gen),
        "packed": q.packed,
        "absmax": q.absmax,
        "wq": t.q,
        "wscale": t.scale,
        "wb": torch.randn(n, k, generator=gen).bfloat16(),
        "xm": torch.randn(m, h, generator=gen),
        "idx": torch.stack([torch.randperm(e, generator=gen)[:a] for _ in range(m)]),
        "rw": torch.rand(m, a, generator=gen),
        **{f"{p}{s}": getattr(tq, f) for p, tq in zip("gud", (gate, up, down), strict=True) for s, f in (("p", "packed"), ("a", "absmax"))},
        "gb": torch.randn(e, i, h, generator=gen).bfloat16(),
        "ub": torch.randn(e, i, h, generator=gen).bfloat16(),
        "db": torch.randn(e, h, i, generator=gen).bfloat16(),
    }  # fmt: skip
    with open(path, "wb") as fh:
        fh.write(torch.tensor([m, n, k, e, h, i, a], dtype=torch.int64).numpy().tobytes())
        for tensor in arrays.values():
            fh.write(tensor.contiguous().view(torch.uint8).numpy().tobytes())
    return {**arrays, "dims": torch.tensor([m, n, k, e, h, i, a])}


def _host_results(inputs: dict[str, torch.Tensor], lib) -> list[torch.Tensor]:
    """What the driver computes, from this machine's `lib`, in the driver's output order."""
    experts = [(inputs[f"{p}p"], inputs[f"{p}a"]) for p in "gud"]
    bf16_experts = [inputs[f"{p}b"] for p in "gud"]
    return [
        native.q8_matmul(inputs["x"], inputs["packed"], inputs["absmax"], lib=lib),
        native.int8_blocks_matmul(inputs["x"], inputs["wq"], inputs["wscale"], lib=lib),
        native.nf4_dequantize(inputs["packed"], inputs["absmax"], lib=lib),
        native.bf16_matvec(inputs["x"][0], inputs["wb"], lib=lib),
        native.nf4_moe(inputs["xm"], inputs["idx"], inputs["rw"], *experts, lib=lib),
        native.nf4_moe(inputs["xm"][:1], inputs["idx"][:1], inputs["rw"][:1], *experts, lib=lib)[0],
        native.bf16_moe_decode(inputs["xm"][0], inputs["idx"][0], inputs["rw"][0], *bf16_experts, lib=lib),
        native.bf16_moe(inputs["xm"], inputs["idx"], inputs["rw"], *bf16_experts, lib=lib),
        native.nf4_bf16_moe(inputs["xm"], inputs["idx"], inputs["rw"], *experts, lib=lib),
        native.nf4_bf16_matmul(inputs["x"], inputs["packed"], inputs["absmax"], lib=lib),
    ]


@pytest.mark.skipif(
    shutil.which("aarch64-linux-gnu-gcc") is None,
    reason="no aarch64 cross compiler (apt-get install gcc-aarch64-linux-gnu)",
)
def test_neon_dotprod_build_cross_compiled_equals_scalar(tmp_path: Path) -> None:  # fmt: skip
    """The NEON path compiles for ARMv8.2 with dot products; under qemu-user it computes the scalar build's
    results (the same integer sums; float rounding apart)."""
    kernel = native.compile_command("neon_dotprod", "aarch64-linux-gnu-gcc", str(tmp_path / "k.so"), openmp=False)
    subprocess.run(kernel, check=True, capture_output=True, timeout=300)
    driver = tmp_path / "driver"
    source = kernel[kernel.index("-o") - 1]
    flags = [f for f in kernel[1 : kernel.index(source)] if f not in ("-shared", "-fPIC")]
    cmd = ["aarch64-linux-gnu-gcc", *flags, "-static", source, str(Path(__file__).with_name("native_driver.c"))]
    subprocess.run([*cmd, "-o", str(driver), "-lm"], check=True, capture_output=True, timeout=300)
    qemu = shutil.which("qemu-aarch64") or shutil.which("qemu-aarch64-static")
    if qemu is None:
        pytest.skip("compiled for aarch64; no qemu-user to run it (apt-get install qemu-user)")
    inputs = _driver_inputs(tmp_path / "in.bin")
    subprocess.run([qemu, str(driver), str(tmp_path / "in.bin"), str(tmp_path / "out.bin")], check=True, timeout=300)
    raw = (tmp_path / "out.bin").read_bytes()
    assert raw[:16].decode().strip() == "neon_dotprod"
    got = torch.frombuffer(bytearray(raw[16:]), dtype=torch.float32)
    expected = _host_results(inputs, native.build("scalar"))
    assert got.numel() == sum(t.numel() for t in expected)
    for part, want in zip(got.split([t.numel() for t in expected]), expected, strict=True):
        torch.testing.assert_close(part.view(want.shape), want, rtol=1e-4, atol=1e-5 * float(want.abs().max()))


def _plan_in_subprocess(tmp_path: Path, **env: str) -> dict:
    code = "import json, dataclasses; from kimivl_cli.kernels import cpu; print(json.dumps(dataclasses.asdict(cpu.plan())))"
    result = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "KIMIVL_CACHE": str(tmp_path), **env},
    )
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_plan_is_measured_once_cached_and_honours_the_switches(tmp_path: Path) -> None:
    first = _plan_in_subprocess(tmp_path)
    assert first["native"] == cpu.plan().native or "KIMIVL_CPU_OFF" in os.environ
    assert first["native"] in cpu.native_candidates() and first["why"]["native"]
    cached = list((tmp_path / "cpu").glob("plan-*.json"))
    assert len(cached) == 1 and _plan_in_subprocess(tmp_path) == first  # read back, not measured again
    off = [v for v in native.VARIANTS if v != "scalar"]  # names this CPU lacks are ignored
    switched = _plan_in_subprocess(tmp_path, KIMIVL_CPU_OFF=",".join([*off, "bf16_gemm", "nf4_fused"]))
    assert switched["native"] == "scalar" and switched["half_gemm"] == "fp32"
    assert switched["nf4_fused_max_rows"] == 1 and "KIMIVL_CPU_OFF" in switched["why"]["half_gemm"]
    assert _plan_in_subprocess(tmp_path, KIMIVL_NATIVE="0")["native"] is None
