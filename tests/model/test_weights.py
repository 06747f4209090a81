"""The checkpoint loader: sharded == single, dtypes, strict key/shape checks, pickle refusal,
Hub-cache resolution offline, and the full-size parameter count."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from kimivl_cli.errors import CheckpointError
from kimivl_cli.model.config import KimiVLConfig
from kimivl_cli.model.kimivl import KimiVL
from kimivl_cli.model.weights import load_model, resolve_checkpoint


@pytest.fixture(scope="module")
def tiny_a(golden_dir: Path) -> Path:
    return golden_dir / "tiny-a"


def _copy(src: Path, dst: Path, tensors: dict[str, torch.Tensor] | None = None) -> Path:
    dst.mkdir(parents=True, exist_ok=True)
    shutil.copy(src / "config.json", dst / "config.json")
    if tensors is not None:
        save_file(tensors, str(dst / "model.safetensors"), metadata={"format": "pt"})
    return dst


def _error(path: Path | str, **kwargs) -> str:
    with pytest.raises(CheckpointError) as err:
        load_model(path, **kwargs)
    line = err.value.one_line()
    assert "\n" not in line
    return line


def test_full_size_parameter_count() -> None:
    with torch.device("meta"):
        model = KimiVL(KimiVLConfig())
    assert sum(p.numel() for p in model.parameters()) == 16_407_656_048


def test_sharded_loads_the_same_tensors_as_single_file(tiny_a: Path, golden_dir: Path) -> None:
    single, _ = load_model(tiny_a, dtype=torch.float32)
    sharded, _ = load_model(golden_dir / "tiny-a-sharded", dtype=torch.float32)
    a, b = single.state_dict(), sharded.state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    official = load_file(str(tiny_a / "model.safetensors"))
    stacked = a["language_model.model.layers.2.mlp.experts.down_proj"]
    assert torch.equal(stacked[5], official["language_model.model.layers.2.mlp.experts.5.down_proj.weight"])


def test_bf16_load_keeps_the_router_in_fp32(tiny_a: Path) -> None:
    model, _ = load_model(tiny_a)
    gate = model.language_model.model.layers[1].mlp.gate
    assert gate.weight.dtype == gate.e_score_correction_bias.dtype == torch.float32
    assert model.language_model.lm_head.weight.dtype == torch.bfloat16
    assert not any(p.is_meta or p.requires_grad for p in model.parameters())


def test_missing_key_is_named(tiny_a: Path, tmp_path: Path) -> None:
    tensors = load_file(str(tiny_a / "model.safetensors"))
    del tensors["language_model.model.layers.1.mlp.experts.3.up_proj.weight"]
    line = _error(_copy(tiny_a, tmp_path, tensors))
    assert "lacks 1 tensor" in line and "layers.1.mlp.experts.3.up_proj.weight" in line


def test_unknown_key_is_named_and_rotary_tables_are_ignored(tiny_a: Path, tmp_path: Path) -> None:
    tensors = load_file(str(tiny_a / "model.safetensors"))
    tensors["language_model.model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(4)
    load_model(_copy(tiny_a, tmp_path / "ok", tensors))
    tensors["language_model.model.layers.9.mlp.gate.weight"] = torch.ones(4)
    assert "does not know: language_model.model.layers.9.mlp.gate.weight" in _error(
        _copy(tiny_a, tmp_path / "bad", tensors)
    )


def test_wrong_shape_is_named(tiny_a: Path, tmp_path: Path) -> None:
    tensors = load_file(str(tiny_a / "model.safetensors"))
    tensors["language_model.model.norm.weight"] = torch.ones(65)
    line = _error(_copy(tiny_a, tmp_path, tensors))
    assert "language_model.model.norm.weight has shape [65], config.json implies [64]" in line


def test_pickle_checkpoints_are_refused_unread(tiny_a: Path, tmp_path: Path) -> None:
    folder = _copy(tiny_a, tmp_path)
    (folder / "pytorch_model.bin").write_bytes(b"not even read")
    assert "pytorch_model.bin" in _error(folder) and "pickle" in _error(folder)
    (folder / "model.safetensors").write_bytes(b"\x80\x04pickle in disguise")
    assert "not a readable safetensors file" in _error(folder)


def test_broken_config_and_missing_shard(tiny_a: Path, golden_dir: Path, tmp_path: Path) -> None:
    folder = _copy(tiny_a, tmp_path / "cfg", load_file(str(tiny_a / "model.safetensors")))
    (folder / "config.json").write_text("{ not json")
    assert "config.json: unreadable (not valid JSON" in _error(folder)
    config = json.loads((tiny_a / "config.json").read_text())
    del config["text_config"]["kv_lora_rank"]
    (folder / "config.json").write_text(json.dumps(config))
    assert "text_config.kv_lora_rank" in _error(folder)
    sharded = shutil.copytree(golden_dir / "tiny-a-sharded", tmp_path / "sharded")
    (sharded / "model-00002-of-00003.safetensors").unlink()
    assert "model-00002-of-00003.safetensors, which is missing" in _error(sharded)


def test_hub_ids_resolve_through_the_cache_offline(tiny_a: Path, tmp_path: Path, monkeypatch) -> None:
    from huggingface_hub import constants

    cache = tmp_path / "hub"
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    line = _error("someone/kimi-vl-tiny")
    assert "HF_HUB_OFFLINE" in line and "hf download someone/kimi-vl-tiny" in line
    repo = cache / "models--someone--kimi-vl-tiny"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("a" * 40)
    shutil.copytree(tiny_a, repo / "snapshots" / ("a" * 40))
    assert resolve_checkpoint("someone/kimi-vl-tiny") == repo / "snapshots" / ("a" * 40)
    assert "no such folder" in _error(tmp_path / "does" / "not" / "exist")
