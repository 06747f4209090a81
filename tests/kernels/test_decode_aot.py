"""The fused decode step's kernels as a GPU would build them: every distinct launch of a full-size
NF4 and bf16 decode step, compiled ahead of time for sm_80/86/89/90 (no GPU needed), fits the
target's shared memory without register spills, and the weight-streaming launches fill two waves
of a 132-SM chip. Runs `python -m kimivl_cli.testing.aot` without the interpreter."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from kimivl_cli.testing.aot import TARGETS, nvidia_backend_available

STREAMING = {"_gemv_kernel", "_moe_gate_up_kernel", "_moe_down_kernel"}  # read >= 1 MB of weights each


@pytest.fixture(scope="module")
def report() -> list[dict]:
    if not nvidia_backend_available():
        pytest.skip("this triton has no NVIDIA backend (ptxas, cuobjdump)")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run(
        [sys.executable, "-m", "kimivl_cli.testing.aot"], capture_output=True, text=True, env=env, timeout=1200
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout)


def test_every_launch_compiles_for_every_target(report) -> None:
    kernels = {r["name"] for r in report}
    assert {"_gemv_kernel", "_mla_prep_kernel", "_mla_attend_kernel", "_mla_out_kernel"} <= kernels
    assert {"_moe_route_kernel", "_moe_gate_up_kernel", "_moe_down_kernel"} <= kernels
    per_launch = {}
    for r in report:
        per_launch.setdefault((r["name"], json.dumps(r["constexprs"])), set()).add(r["cc"])
    assert all(targets == set(TARGETS) for targets in per_launch.values())


def test_shared_memory_fits_and_nothing_spills(report) -> None:
    too_big = [(r["name"], r["cc"], r["shared"]) for r in report if r["shared"] > r["shared_limit"]]
    spills = [(r["name"], r["cc"], r["spill_bytes"]) for r in report if r["spill_bytes"]]
    assert too_big == [] and spills == []


def test_weight_streaming_launches_fill_two_waves_of_132_sms(report) -> None:
    small = [(r["name"], r["grid"]) for r in report if r["name"] in STREAMING and r["programs"] < 264]
    assert small == []
