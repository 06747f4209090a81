"""benchmarks/gpu on a CPU: every section runs at small sizes and writes its JSON, a failing section
keeps the others, and a machine without CUDA gets one line, not a traceback."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from kimivl_cli.testing.checkpoint import SIZES

ROOT = Path(__file__).resolve().parents[2]
spec = importlib.util.spec_from_file_location("gpu_bench", ROOT / "benchmarks" / "gpu" / "bench.py")
bench = sys.modules["gpu_bench"] = importlib.util.module_from_spec(spec)  # dataclasses look their module up
spec.loader.exec_module(bench)


def _setup() -> bench.Setup:
    return bench.Setup(
        "cpu", moe_shape=(4, 64, 64, 2), moe_tokens=(1, 5), dense_shapes={"q_proj": (96, 128)}, config=SIZES["small"],
        decode_contexts=(20,), attention_slots=(20,), decode_tokens=3, prefill_lengths=(24,), image_size=56, runs=1,
    )  # fmt: skip


@pytest.mark.slow
def test_every_section_writes_its_json(tmp_path: Path) -> None:
    path = tmp_path / "gpu_bench.json"
    written: list[set[str]] = []
    report = bench.Report(path)
    original = report.write
    report.write = lambda: (original(), written.append(set(json.loads(path.read_text()))))
    bench.run(_setup(), report)
    data = json.loads(path.read_text())
    assert data["errors"] == {}
    sections = ["env", "moe", "dense", "decode_kernels", "model_nf4", "model_bf16", "traced"]
    assert [sorted(s - {"errors", "section_seconds"}) for s in written] == [sorted(sections[: n + 1]) for n in range(7)]
    for tokens in (1, 5):
        row = data["moe"][f"{tokens}_tokens"]
        assert "errors" not in row
        assert row["triton_nf4_rel_err"] < 2e-2 and row["triton_bf16_rel_err"] < 2e-2 and row["loop_bf16_rel_err"] == 0
        assert all(row[f"{v}_ms"] > 0 for v in ("triton_nf4", "triton_bf16", "grouped_mm_bf16", "loop_bf16"))
    kernels = data["decode_kernels"]
    for fmt in ("nf4", "bf16"):
        for name in ("q_kv_a", "o_proj", "dense_gate_up", "dense_down", "moe_block", "mla_20_slots"):
            row = kernels[f"{fmt}_{name}"]
            assert "errors" not in row, (fmt, name, row)
            assert row["rel_err"] < 5e-2 and row["gb_s"] > 0 and row["baseline_gb_s"] > 0, (fmt, name, row)
        assert kernels[f"{fmt}_moe_block"]["routing_matches"]
    assert kernels["bf16_lm_head"]["rel_err"] < 5e-2  # bf16 on the interpreter: fp32 -> bf16 truncates
    dense = data["dense"]["q_proj"]
    assert dense["nf4_gb_s"] > 0 and dense["bf16_gb_s"] > 0 and dense["nf4_rel_err"] < 2e-2
    for name in ("model_nf4", "model_bf16"):
        model = data[name]
        assert "errors" not in model, model
        assert model["decode_20"]["tokens_per_s"] > 0 and model["prefill_24_tokens_per_s"] > 0
        assert model["vision_56px"]["patches"] == 16 and model["weights_gb"] > 0
    assert data["traced"]["nf4"]["copies"] == data["traced"]["nf4"]["syncs"] == 0
    assert data["traced"]["none"]["launches"] > 0


def test_a_failing_section_keeps_the_others(tmp_path: Path, monkeypatch) -> None:
    def broken(out: dict, setup: bench.Setup) -> None:
        out["partial"] = 1
        raise RuntimeError("kernel launch failed")

    monkeypatch.setattr(bench, "bench_moe", broken)
    monkeypatch.setattr(bench, "bench_dense", lambda out, setup: out.update(ok=True))
    monkeypatch.setattr(bench, "bench_decode_kernels", lambda out, setup: None)
    monkeypatch.setattr(bench, "bench_model", lambda out, setup, quant: out.update(quant=quant))
    monkeypatch.setattr(bench, "bench_traced", lambda out, setup: None)
    report = bench.Report(tmp_path / "out.json")
    bench.run(_setup(), report)
    data = json.loads((tmp_path / "out.json").read_text())
    assert "RuntimeError: kernel launch failed" in data["errors"]["moe"] and data["moe"] == {"partial": 1}
    assert data["dense"] == {"ok": True} and data["model_bf16"] == {"quant": "none"}
    assert set(data["section_seconds"]) == {
        "env",
        "moe",
        "dense",
        "decode_kernels",
        "model_nf4",
        "model_bf16",
        "traced",
    }


def test_run_sh_without_cuda_says_so_in_one_line(tmp_path: Path) -> None:
    env = {**os.environ, "OUT": str(tmp_path), "PYTHON": sys.executable}
    done = subprocess.run(
        ["bash", str(ROOT / "benchmarks" / "gpu" / "run.sh"), "--quick"], env=env, capture_output=True, text=True
    )
    if done.returncode == 0:
        pytest.skip("this machine has a CUDA device")
    assert done.returncode == 1
    assert done.stderr.strip().splitlines()[-1].startswith("no CUDA device") and "Traceback" not in done.stderr
    assert json.loads((tmp_path / "gpu_bench.json").read_text())["errors"] == {"env": "no CUDA device"}


def test_the_bench_imports_without_bitsandbytes_or_pymupdf(tmp_path: Path) -> None:
    """The bare CUDA image has neither: the code the bench imports must not need them."""
    blocker = tmp_path / "sitecustomize.py"
    blocker.write_text(
        "import sys\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in ('bitsandbytes', 'fitz', 'pymupdf'):\n"
        "            raise ImportError(f'{name} is not installed here')\n"
        "sys.meta_path.insert(0, Block())\n"
    )
    env = {**os.environ, "PYTHONPATH": f"{tmp_path}{os.pathsep}{ROOT}"}
    code = "import runpy; runpy.run_path('benchmarks/gpu/bench.py', run_name='bench'); import sys; print(sorted(m for m in sys.modules if m.split('.')[0] in ('bitsandbytes', 'fitz', 'pymupdf')))"
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1] == "[]"
