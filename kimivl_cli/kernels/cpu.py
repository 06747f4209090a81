"""What runs where on this CPU: features detected, candidates timed once, choices cached per machine.

CPUs differ in what is fast: with AVX-512 BF16/AMX a bf16 GEMM (oneDNN, through torch) beats
upcasting to fp32, on AVX2 it is several times slower; AVX-512 VNNI sums int8 blocks in one
instruction, AVX2 in three. So nothing here is a constant tuned on one machine: `plan()` detects the
features, times the candidates that matter and keeps the fastest:

- `native`: the kernel build (`native.VARIANTS`) for NF4 and bf16 products (timed: a decode GEMV and a
  prefill-sized product).
- `half_gemm`: how a half-precision GEMM of several rows runs: "bf16" (torch's own, oneDNN/AMX where the
  CPU has it) or "fp32" (weight and input upcast; then `upcast_min_rows` is the smallest row count from
  which the upcast wins). One-row products use the native bf16 GEMV.
- `nf4_fused_max_rows`, `nf4_tiles_max_rows`: up to how many rows an NF4 product runs on the fused int8
  kernel (reading the codes), then up to how many as bf16 tiles (`native.nf4_bf16_matmul`: 16 weight rows
  at a time dequantised in cache, AMX where the CPU has it), rather than dequantising the matrix once and
  running `half_gemm`'s GEMM.
- `bf16_moe_max_rows`: up to how many rows per expert (on average) the routed experts of bf16 stacks run
  as one native call (`native.bf16_moe`: AMX tiles, or bf16 dot products, reading each active expert's
  weights once) rather than torch's GEMM per expert (oneDNN repacks each weight matrix per call).
- `nf4_moe_bf16_min_rows`: from how many rows per expert NF4 routed experts run as one native call that
  dequantises 16 weight rows at a time into cache and multiplies them like bf16_moe (`native.nf4_bf16_moe`)
  rather than the fused int8 kernel or a dequantised matrix + GEMM per expert, whichever is faster there.

The plan is measured on first use (about a second, plus compiling the kernels once) and stored in
$KIMIVL_CACHE/cpu/, keyed by the CPU's features, the torch version, the kernel
source and the switches below; `kimivl info` shows it with the reasons.

Switches: KIMIVL_CPU_OFF=name[,name...] takes candidates out (kernel variants `avx512_vnni`, `avx2`,
`neon_dotprod`, `avx512_bf16`, `amx`; `bf16_gemm`; `nf4_fused`; `bf16_moe`: the native grouped bf16 experts; `fused_decode`: the whole-model native decode step of
engine/cpu_decode.py, leaving torch's step over the single kernels), as if the CPU lacked them;
KIMIVL_NATIVE=0 turns every native kernel off.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import platform
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from kimivl_cli.kernels import native

SWITCHES = (*[v for v in native.VARIANTS if v != "scalar"], "bf16_gemm", "nf4_fused", "bf16_moe", "fused_decode")
_PLAN_VERSION = 3


def switched_off() -> frozenset[str]:
    """Candidates KIMIVL_CPU_OFF takes out (unknown names are ignored: a stale setting must not break runs)."""
    names = {n.strip() for n in os.environ.get("KIMIVL_CPU_OFF", "").split(",")}
    return frozenset(names & set(SWITCHES))


@functools.cache
def features() -> frozenset[str]:
    """The CPU's feature flags as Linux names them (x86 `flags`, ARM `Features`); Apple Silicon
    (no /proc/cpuinfo) has NEON with the dot product on every model."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() in ("flags", "Features"):
                return frozenset(value.split())
    except OSError:
        pass
    if sys.platform == "darwin" and platform.machine() == "arm64":
        return frozenset({"asimd", "asimddp"})
    return frozenset()


def native_candidates() -> list[str]:
    """Kernel variants this CPU can run and the switches leave in, widest first ("scalar" last)."""
    if not native.enabled():
        return []
    off, have = switched_off(), features()
    return [name for name, (needs, _) in native.VARIANTS.items() if name not in off and needs <= have]


@dataclass(frozen=True)
class CpuPlan:
    native: str | None  # kernel variant, None: no native kernels
    half_gemm: str  # "bf16" | "fp32"
    upcast_min_rows: int | None  # with half_gemm "fp32": rows from which the upcast wins
    nf4_fused_max_rows: int  # NF4 products of up to this many rows read the codes (fused int8 kernel)
    nf4_tiles_max_rows: int  # then up to this many: bf16 tiles dequantised in cache (else dequantise + GEMM)
    bf16_moe_max_rows: int  # bf16 routed experts of up to this many rows per expert: one native call
    nf4_moe_bf16_min_rows: int  # NF4 routed experts of at least this many rows per expert: bf16 tiles
    why: dict[str, str] = field(default_factory=dict)
    timings_ms: dict[str, float] = field(default_factory=dict)

    def upcasts(self, rows: int) -> bool:
        """Whether a half-precision GEMM of `rows` rows should run in fp32."""
        return self.half_gemm == "fp32" and self.upcast_min_rows is not None and rows >= self.upcast_min_rows


def _best_ms(fn: Callable[[], object], repeats: int = 5) -> float:
    """Best CPU time of the calling thread (the plan is measured on one thread: a busy neighbour that
    takes the core away does not count, as wall time would)."""
    fn()
    best = float("inf")
    for _ in range(repeats):
        t = time.thread_time()
        fn()
        best = min(best, time.thread_time() - t)
    return best * 1e3


def _random_nf4(n: int, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    packed = torch.randint(0, 256, (n, k // 2), dtype=torch.uint8, generator=gen)
    return packed, torch.rand(n, k // 64, generator=gen) + 0.5


def _choose_native(timings: dict[str, float], why: dict[str, str]) -> str | None:
    candidates = native_candidates()
    built = [v for v in candidates if native.build(v) is not None]
    if not built:
        why["native"] = "off (KIMIVL_NATIVE=0)" if not native.enabled() else "no C compiler builds the kernels"
        return None
    if len(built) == 1:
        why["native"] = f"{built[0]}: the only variant this CPU runs" + (
            f" (off: {', '.join(sorted(switched_off()))})" if switched_off() else ""
        )
        return built[0]
    packed, absmax = _random_nf4(2048, 2048)
    one, many = torch.randn(1, 2048), torch.randn(32, 2048)
    moe = _random_bf16_moe(rows=16)
    for v in built[:-1] if built[-1] == "scalar" else built:  # scalar never wins where a SIMD build runs
        lib = native.build(v)
        timings[f"native_{v}"] = round(
            _best_ms(lambda lib=lib: native.q8_matmul(one, packed, absmax, lib=lib))
            + _best_ms(lambda lib=lib: native.q8_matmul(many, packed, absmax, lib=lib))
            + _best_ms(lambda lib=lib: native.bf16_moe(*moe, lib=lib)),
            3,
        )
    timed = {v: timings[f"native_{v}"] for v in built if f"native_{v}" in timings}
    best = min(timed, key=timed.__getitem__)
    why["native"] = (
        f"{best}: fastest of "
        + ", ".join(f"{v} {t:.2f} ms" for v, t in timed.items())
        + (" (a 2048x2048 NF4 GEMV + a 32-row product + bf16 experts, 16 rows each)")
    )
    return best


def _choose_half_gemm(timings: dict[str, float], why: dict[str, str]) -> tuple[str, int | None]:
    if "bf16_gemm" in switched_off():
        why["half_gemm"] = "fp32: bf16_gemm switched off (KIMIVL_CPU_OFF)"
        return "fp32", 2
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(1024, 1024, generator=gen).to(torch.bfloat16)
    upcast_from = None
    for rows in (64, 16, 4, 2):
        x = torch.randn(rows, 1024, generator=gen).to(torch.bfloat16)
        half = _best_ms(lambda x=x: torch.nn.functional.linear(x, w), 3)
        upcast = _best_ms(lambda x=x: torch.nn.functional.linear(x.float(), w.float()).to(x.dtype), 3)
        timings[f"gemm_bf16_{rows}rows"], timings[f"gemm_fp32_upcast_{rows}rows"] = round(half, 3), round(upcast, 3)
        if upcast >= half:
            break
        upcast_from = rows
    if upcast_from is None:
        why["half_gemm"] = (
            f"bf16: {timings['gemm_bf16_64rows']:.2f} ms vs {timings['gemm_fp32_upcast_64rows']:.2f} ms upcast "
            "(64 x 1024 @ 1024 x 1024)"
        )
        return "bf16", None
    why["half_gemm"] = f"fp32 from {upcast_from} rows: " + ", ".join(
        f"{r} rows bf16 {timings[f'gemm_bf16_{r}rows']:.2f} / fp32 {timings[f'gemm_fp32_upcast_{r}rows']:.2f} ms"
        for r in (64, 16, 4, 2)
        if f"gemm_bf16_{r}rows" in timings
    )
    return "fp32", upcast_from


_NF4_ROW_SAMPLES = (4, 8, 16, 32, 64, 128, 256, 512, 1024)


def _choose_nf4_rows(
    variant: str | None, half_gemm: str, timings: dict[str, float], why: dict[str, str]
) -> tuple[int, int]:
    """(nf4_fused_max_rows, nf4_tiles_max_rows): the NF4 product's path by row count, from the winner at each
    sampled count. Each candidate's time grows linearly in rows, int8 steepest, then tiles, then dequantise +
    GEMM (a fixed cost, then a small slope)."""
    if variant is None:
        why["nf4_fused_max_rows"] = "0: no native kernels (every NF4 product dequantises)"
        return 0, 0
    lib = native.build(variant)
    dtype = torch.bfloat16 if half_gemm == "bf16" else torch.float32
    packed, absmax = _random_nf4(1408, 2048)
    candidates = {
        "int8": lambda x: native.q8_matmul(x, packed, absmax, lib=lib),
        "tiles": lambda x: native.nf4_bf16_matmul(x, packed, absmax, lib=lib),
        "dequantise": lambda x: torch.nn.functional.linear(x, native.nf4_dequantize(packed, absmax, dtype, lib=lib)),
    }
    if "nf4_fused" in switched_off():
        candidates.pop("int8")
    winners = _nf4_row_winners(candidates, dtype, timings)
    fused = _last_win(winners, 0, "int8")
    tiles = _last_win(winners, fused, "tiles")
    fused_rows, tiles_rows = (_row_bound(fused, 1), _row_bound(tiles, 0))  # one row (decode) always reads codes
    tiles_rows = tiles_rows if tiles > fused else fused_rows
    why["nf4_fused_max_rows"] = (
        f"{fused_rows}: "
        + ("nf4_fused switched off (KIMIVL_CPU_OFF); " if "nf4_fused" in switched_off() else "")
        + ", ".join(f"{r} rows {w}" for r, w in zip(_NF4_ROW_SAMPLES, winners, strict=True))
        + f" fastest (int8 codes / bf16 tiles / dequantise + {half_gemm} GEMM, 1408 x 2048)"
    )
    why["nf4_tiles_max_rows"] = f"{tiles_rows}: bf16 tiles ({variant}) " + (
        "never won" if tiles_rows == fused_rows else f"from {fused_rows + 1} rows"
    )
    return fused_rows, tiles_rows


def _nf4_row_winners(
    candidates: dict[str, Callable[[torch.Tensor], object]], dtype: torch.dtype, timings: dict[str, float]
) -> list[str]:
    """The fastest candidate at each of `_NF4_ROW_SAMPLES` rows. `candidates` come steepest in rows first: one
    that lost twice running to a later (flatter) one never wins again, and is not timed again."""
    order = list(candidates)
    losses = dict.fromkeys(candidates, 0)
    winners = []
    for rows in _NF4_ROW_SAMPLES:
        x = torch.randn(rows, 2048).to(dtype)
        ms = {name: _best_ms(lambda f=f, x=x: f(x), 3) for name, f in candidates.items() if losses[name] < 2}
        winners.append(min(ms, key=ms.__getitem__))
        for name, t in ms.items():
            timings[f"nf4_{name}_{rows}rows"] = round(t, 3)
            losses[name] = losses[name] + 1 if order.index(winners[-1]) > order.index(name) else 0
    return winners


def _row_bound(end: int, default: int) -> int:
    """The row count up to which the first `end` samples' winner runs (all samples: any count)."""
    return 1 << 20 if end == len(_NF4_ROW_SAMPLES) else _NF4_ROW_SAMPLES[end - 1] if end else default


def _last_win(winners: list[str], start: int, name: str) -> int:
    """The end of the run of `name` wins in `winners` from index `start`."""
    end = start
    while end < len(winners) and winners[end] == name:
        end += 1
    return end


def _upcast_linear(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.linear(x.float(), w.float()).to(x.dtype)


def _random_bf16_moe(rows: int, experts: int = 4, top_k: int = 2) -> tuple[torch.Tensor, ...]:
    """A prefill-shaped routed-expert step with bf16 stacks ([E, 512, 1024] gate/up), `rows` pairs per expert."""
    gen = torch.Generator().manual_seed(0)
    tokens = rows * experts // top_k
    idx = (torch.arange(tokens * top_k) % experts).view(tokens, top_k)
    stacks = [(torch.randn(experts, *shape, generator=gen) * 0.03).bfloat16() for shape in ((512, 1024),) * 2]
    down = (torch.randn(experts, 1024, 512, generator=gen) * 0.03).bfloat16()
    return torch.randn(tokens, 1024, generator=gen).bfloat16(), idx, torch.rand(tokens, top_k), *stacks, down


def _choose_bf16_moe_rows(variant: str | None, half_gemm: str, timings: dict[str, float], why: dict[str, str]) -> int:
    if variant is None:
        why["bf16_moe_max_rows"] = "0: no native kernels (torch runs each expert)"
        return 0
    if "bf16_moe" in switched_off():
        why["bf16_moe_max_rows"] = "0: bf16_moe switched off (KIMIVL_CPU_OFF): torch runs each expert"
        return 0
    from kimivl_cli.kernels.moe_cpu import grouped_experts_reference  # moe_cpu reads this plan

    lib = native.build(variant)
    linear = torch.nn.functional.linear if half_gemm == "bf16" else _upcast_linear
    fused, loop = {}, {}
    for rows in (4, 64):
        moe = _random_bf16_moe(rows)
        fused[rows] = _best_ms(lambda moe=moe: native.bf16_moe(*moe, lib=lib), 3)
        loop[rows] = _best_ms(lambda moe=moe: grouped_experts_reference(*moe, linear=linear), 3)
        timings[f"bf16_moe_native_{rows}rows"], timings[f"bf16_moe_torch_{rows}rows"] = (
            round(fused[rows], 3),
            round(loop[rows], 3),
        )
    # both grow linearly in rows: native ~ n + a·r, torch ~ d + g·r; they cross at (d - n) / (a - g)
    a, g = (fused[64] - fused[4]) / 60, (loop[64] - loop[4]) / 60
    n, d = fused[4] - 4 * a, loop[4] - 4 * g
    if fused[64] <= loop[64] and fused[4] <= loop[4]:
        rows = 1 << 20
    elif fused[4] > loop[4]:  # loses on few rows: never (a machine where it only wins on many is not known)
        rows = 0
    else:
        rows = max(0, round((d - n) / (a - g)))
    why["bf16_moe_max_rows"] = (
        f"{rows}: native ({variant}) {fused[4]:.2f} / {fused[64]:.2f} ms vs torch {half_gemm} GEMM per expert "
        f"{loop[4]:.2f} / {loop[64]:.2f} ms at 4 / 64 rows per expert (4 experts, 1024 -> 512 -> 1024)"
    )
    return rows


def _choose_nf4_moe_rows(variant: str | None, half_gemm: str, timings: dict[str, float], why: dict[str, str]) -> int:
    never = 1 << 20
    if variant is None or "bf16_moe" in switched_off():
        why["nf4_moe_bf16_min_rows"] = f"{never} (never): " + (
            "no native kernels" if variant is None else "bf16_moe switched off (KIMIVL_CPU_OFF)"
        )
        return never
    lib = native.build(variant)
    dtype = torch.bfloat16 if half_gemm == "bf16" else torch.float32
    wins, report = [], []
    samples = (4, 8, 16, 64)
    for rows in samples:
        tiles, fused, dequant = _time_nf4_moe(rows, dtype, lib)
        timings[f"nf4_moe_bf16_{rows}rows"], timings[f"nf4_moe_int8_{rows}rows"] = round(tiles, 3), round(fused, 3)
        timings[f"nf4_moe_dequant_gemm_{rows}rows"] = round(dequant, 3)
        wins.append(tiles < min(fused, dequant))
        report.append(f"{rows} rows: {tiles:.2f} vs int8 {fused:.2f} / dequantise + {half_gemm} GEMM {dequant:.2f} ms")
    from_rows = next((r for i, r in enumerate(samples) if all(wins[i:])), never)
    why["nf4_moe_bf16_min_rows"] = f"{from_rows}: bf16 tiles ({variant}) " + ", ".join(report) + " (4 experts)"
    return from_rows


def _time_nf4_moe(rows: int, dtype: torch.dtype, lib: object) -> tuple[float, float, float]:
    """ms of the NF4 routed-expert candidates at `rows` per expert: bf16 tiles, fused int8, dequantise + GEMM."""
    x, idx, w, *stacks = _random_bf16_moe(rows)
    nf4 = []
    for t in stacks:
        packed, absmax = _random_nf4(t.shape[0] * t.shape[1], t.shape[2])
        nf4.append((packed.view(*t.shape[:2], -1), absmax.view(*t.shape[:2], -1)))
    return (
        _best_ms(lambda: native.nf4_bf16_moe(x, idx, w, *nf4, lib=lib), 3),
        _best_ms(lambda: native.nf4_moe(x, idx, w, *nf4, lib=lib), 3),
        _best_ms(lambda: _nf4_moe_dequantising(x, idx, w, nf4, dtype, lib), 3),
    )


def _nf4_moe_dequantising(
    x: torch.Tensor,
    idx: torch.Tensor,
    w: torch.Tensor,
    nf4: list[tuple[torch.Tensor, torch.Tensor]],
    dtype: torch.dtype,
    lib: object,
) -> torch.Tensor:
    """Timing candidate: each active expert's NF4 matrices dequantised whole, then torch GEMMs."""
    out = torch.zeros(x.shape[0], x.shape[1])
    for e in idx.unique().tolist():
        tok, slot = (idx == e).nonzero(as_tuple=True)
        gate, up, down = (native.nf4_dequantize(p[e], a[e], dtype, lib=lib) for p, a in nf4)
        xe = x[tok].to(dtype)
        h = torch.nn.functional.silu(xe @ gate.T) * (xe @ up.T)
        out.index_put_((tok,), (h @ down.T).float() * w[tok, slot, None], accumulate=True)
    return out


def _key() -> str:
    parts = [
        str(_PLAN_VERSION),
        platform.machine(),
        " ".join(sorted(features())),
        torch.__version__,
        native.source_digest(),
        ",".join(sorted(switched_off())),
        os.environ.get("KIMIVL_NATIVE", "1"),
    ]
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:16]


def _measure() -> CpuPlan:
    timings: dict[str, float] = {}
    why: dict[str, str] = {}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # see _best_ms; the candidates scale alike with threads
    try:
        variant = _choose_native(timings, why)
        half_gemm, upcast_from = _choose_half_gemm(timings, why)
        rows, tile_rows = _choose_nf4_rows(variant, half_gemm, timings, why)
        moe_rows = _choose_bf16_moe_rows(variant, half_gemm, timings, why)
        nf4_moe_rows = _choose_nf4_moe_rows(variant, half_gemm, timings, why)
    finally:
        torch.set_num_threads(threads)
    return CpuPlan(variant, half_gemm, upcast_from, rows, tile_rows, moe_rows, nf4_moe_rows, why, timings)


@functools.cache
def plan() -> CpuPlan:
    """This machine's choices: read from the cache, else measured once and stored."""
    path = native.cache_dir() / "cpu" / f"plan-{_key()}.json"
    try:
        return CpuPlan(**json.loads(path.read_text()))
    except (OSError, ValueError, TypeError):
        pass
    with torch.inference_mode():
        chosen = _measure()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(suffix=".json", dir=path.parent)
        with os.fdopen(fd, "w") as fh:
            json.dump(asdict(chosen), fh, indent=1)
        os.replace(tmp, path)
    except OSError:
        pass  # a read-only cache: measure again next time
    return chosen


def describe() -> str:
    """One line per choice, for `kimivl info`."""
    p = plan()
    cpu_flags = sorted(f for f in features() if f.startswith(("avx", "amx", "fma", "asimd", "sve")))
    lines = [f"features: {' '.join(cpu_flags) or 'none detected'}"]
    lines += [f"{name}: {reason}" for name, reason in p.why.items()]
    if p.native is not None:
        lines.append(
            "fused_decode: "
            + ("off: torch ops around the kernels" if "fused_decode" in switched_off() else "one native call per token")
            + " (batch-1 decode with NF4, bf16 or fp32 weights)"
        )
    if switched_off():
        lines.append(f"switched off: {', '.join(sorted(switched_off()))} (KIMIVL_CPU_OFF)")
    return "\n".join(lines)
