"""`kimivl info` through the real CLI: never fails, offline, reports the model it would load."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from kimivl_cli import __version__
from kimivl_cli.cli.common import DEFAULT_MODEL
from kimivl_cli.cli.info import model_location


def kimivl(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "kimivl_cli", *args],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})},
    )


def test_json_report(tmp_path: Path) -> None:
    result = kimivl("info", "--json", env={"HF_HOME": str(tmp_path / "hf"), "KIMIVL_MODEL": ""})
    assert result.returncode == 0, result.stderr
    info = json.loads(result.stdout)  # nothing a native library printed got into stdout
    assert info["versions"]["kimivl"] == __version__
    assert info["versions"]["torch"] and info["versions"]["python"].count(".") == 2
    assert info["device"]["selected"] in ("cpu", "cuda") and info["device"]["cpu"]["cores"] >= 1
    for probe in ("bitsandbytes", "triton"):
        assert isinstance(info[probe]["ok"], bool) and info[probe]["detail"]
    model = info["model"]
    assert model["model"] == DEFAULT_MODEL and model["default"] and model["source"] == "hub"
    assert model["hub_cache"] == str(tmp_path / "hf" / "hub") and not model["ready"]
    assert "hf download" in model["problem"]


def test_model_location(tmp_path: Path) -> None:
    hub = tmp_path / "hub"
    snapshot = hub / "models--org--tiny" / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text("{}")
    (snapshot.parents[1] / "blobs").mkdir()
    cached = model_location("org/tiny", str(hub))
    assert (cached["source"], cached["ready"], cached["path"]) == ("hub", True, str(snapshot))
    assert model_location(str(snapshot))["source"] == "folder" and model_location(str(snapshot))["ready"]
    missing = model_location("org/other", str(hub))
    assert not missing["ready"] and "hf download org/other" in missing["problem"]
    assert model_location("not a model")["source"] == "invalid"


def test_text_report_and_bad_device() -> None:
    result = kimivl("info")
    assert result.returncode == 0, result.stderr
    for label in ("kimivl ", "cpu:", "device:", "bitsandbytes:", "triton:", "cpu kernels:", "model:"):
        assert label in result.stdout
    bad = kimivl("info", "--device", "tpu")
    assert bad.returncode == 2 and bad.stderr.startswith("error: unknown --device")


def test_reports_what_quant_auto_picks(tiny_checkpoint: Path, tmp_path: Path) -> None:
    from kimivl_cli.cli.info import gather

    model = gather(str(tiny_checkpoint), "cpu")["model"]
    assert model["quant_auto"] == "none" and "fit in" in model["quant_auto_reason"]
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text("{not json")
    assert "quant_auto_problem" in gather(str(broken), "cpu")["model"]
