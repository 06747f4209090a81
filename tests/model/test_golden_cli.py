"""`python -m kimivl_cli.golden`: passes on the reference checkpoints, fails (exit 1) on a perturbed
weight and points at the right stages, refuses bad folders (exit 2)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from kimivl_cli import golden as golden_cli


def run_cli(*args: str | Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "kimivl_cli.golden", *map(str, args)], capture_output=True, text=True, timeout=300
    )


def stages(proc: subprocess.CompletedProcess) -> dict[str, dict]:
    report = json.loads(proc.stdout)
    return {s["stage"]: s for s in report["stages"]}


def test_tiny_a_passes_every_stage(golden_dir: Path) -> None:
    proc = run_cli(golden_dir / "tiny-a", "--json")
    assert proc.returncode == 0, proc.stderr
    got = stages(proc)
    expected = {"vision_pos_emb", "vision_tower_out.1", "projector_out", "hidden_states[3]"}
    expected |= {"router_topk_idx.layer2", "logits", "decode_step_logits", "generated_ids"}
    assert expected <= set(got)
    assert {s["status"] for s in got.values()} == {"ok"}
    assert got["generated_ids"]["error"] == 0 and got["generated_ids"]["tolerance"] == 0


def test_tiny_b_passes_in_text_mode(golden_dir: Path) -> None:
    proc = run_cli(golden_dir / "tiny-b")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    # 3 vision + 2 tower + projector, 4 hidden states, 2 MoE layers x (idx, weight), logits, decode, ids
    assert "ok: 17 stages within tolerance" in proc.stdout


def test_sharded_copy_with_the_source_golden_file(golden_dir: Path) -> None:
    proc = run_cli(golden_dir / "tiny-a-sharded", "--golden", golden_dir / "tiny-a" / "golden.safetensors")
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_perturbed_weight_fails_from_its_layer_on(golden_dir: Path, tmp_path: Path) -> None:
    folder = tmp_path / "tiny-a-broken"
    shutil.copytree(golden_dir / "tiny-a", folder)
    weights = load_file(folder / "model.safetensors")
    weights["language_model.model.layers.2.mlp.shared_experts.down_proj.weight"] += 0.01
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
    proc = run_cli(folder, "--json")
    assert proc.returncode == 1, proc.stderr
    status = {name: s["status"] for name, s in stages(proc).items()}
    assert status["projector_out"] == status["hidden_states[2]"] == status["router_topk_idx.layer2"] == "ok"
    assert status["hidden_states[3]"] == status["logits"] == "FAIL"


@pytest.mark.parametrize(
    ("which", "message"),
    [("missing", "is not a folder"), ("no-golden", "no golden file"), ("bad-golden", "not a readable safetensors")],
)
def test_bad_folder_or_golden_file_exits_2(golden_dir: Path, tmp_path: Path, which: str, message: str) -> None:
    args = {
        "missing": [str(tmp_path / "nope")],
        "no-golden": [str(golden_dir / "tiny-a-sharded")],
        "bad-golden": [str(golden_dir / "tiny-a"), "--golden", str(golden_dir / "tiny-a" / "config.json")],
    }[which]
    result = CliRunner().invoke(golden_cli.app, args)
    assert result.exit_code == 2
    assert message in result.output and result.output.startswith("error: ")
