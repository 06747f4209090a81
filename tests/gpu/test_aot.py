"""Every Triton launch the engine makes at Kimi-VL's shapes compiles for sm_80, sm_86, sm_89 and sm_90
(and Blackwell's sm_100 and sm_120) and fits there: shared memory within the target's limit, no
register spills at decode tiles.

The launches are the engine's own (decode 1 token; prefill chunks of 512 and 1,024 tokens; NF4 and
bf16 weights), specialised as Triton's JIT would specialise them, compiled with the ptxas inside the
triton wheel: see `kimivl_cli.testing.triton_aot`. No kernel serves the vision tower (plain torch).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from kimivl_cli.testing.triton_aot import SHARED_LIMIT, missing_backend

pytestmark = [
    pytest.mark.slow,
    pytest.mark.xdist_group("triton_aot"),  # one worker compiles once for every test here
    pytest.mark.skipif(missing_backend() is not None, reason=f"cannot compile for NVIDIA: {missing_backend()}"),
]
CASES = {f"{w} {what}" for w in ("nf4", "bf16") for what in ("decode", "prefill 512", "prefill 1024")}
_RESULTS = {"cc", "shared", "shared_limit", "registers", "spills", "num_warps", "num_stages", "error"}


@pytest.fixture(scope="module")
def compiled() -> list[dict]:
    """The report of `python -m kimivl_cli.testing.triton_aot` (real JIT kernels: no interpreter)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run(
        [sys.executable, "-m", "kimivl_cli.testing.triton_aot"], env=env, capture_output=True, text=True, timeout=1200
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout)


def test_every_engine_launch_compiles_for_every_target(compiled: list[dict]) -> None:
    assert {case for row in compiled for case in row["cases"]} == CASES
    errors = [row for row in compiled if "error" in row]
    assert not errors, errors
    per_launch: dict[str, set[int]] = {}
    for row in compiled:
        per_launch.setdefault(json.dumps({k: row[k] for k in row if k not in _RESULTS}, sort_keys=True), set()).add(
            row["cc"]
        )
    assert all(targets == set(SHARED_LIMIT) for targets in per_launch.values())


def test_shared_memory_fits_every_target(compiled: list[dict]) -> None:
    over = [row for row in compiled if row["shared"] > SHARED_LIMIT[row["cc"]]]
    assert not over, over


def test_no_register_spills_at_decode_tiles(compiled: list[dict]) -> None:
    """A decode step is the fused decode kernels (kernels/gemv.py, moe_decode.py, mla_decode.py)."""
    decode = [row for row in compiled if any("decode" in case for case in row["cases"])]
    fused = {"_gemv_kernel", "_mla_prep_kernel", "_mla_attend_kernel", "_mla_out_kernel", "_moe_route_kernel",
             "_moe_gate_up_kernel", "_moe_down_kernel"}  # fmt: skip
    assert {row["kernel"] for row in decode} == fused
    spilling = [row for row in decode if row["spills"]]
    assert not spilling, spilling
