"""config.json parsing: the official layout in, clear one-line errors for broken files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kimivl_cli.errors import CheckpointError
from kimivl_cli.model.config import KimiVLConfig, TextConfig


def test_golden_configs_parse(golden_dir: Path) -> None:
    a = KimiVLConfig.from_file(golden_dir / "tiny-a" / "config.json")
    b = KimiVLConfig.from_file(golden_dir / "tiny-b" / "config.json")
    assert (a.text.n_group, a.text.topk_group, a.text.n_shared_experts) == (1, 1, 2)
    assert (b.text.n_group, b.text.topk_group, b.text.num_experts_per_tok) == (4, 2, 3)
    assert (b.vision.init_pos_emb_height, b.vision.init_pos_emb_width, b.vision.head_dim) == (6, 10, 16)
    assert a.media_placeholder_token_id == 1000
    assert a.text.cache_width == 32 + 8


def test_defaults_are_the_real_model_and_round_trip() -> None:
    cfg = KimiVLConfig()
    assert cfg.text.cache_width == 576
    assert [cfg.text.is_moe_layer(i) for i in range(3)] == [False, True, True]
    assert KimiVLConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg


def _broken(golden_dir: Path, tmp_path: Path, edit) -> Path:
    raw = json.loads((golden_dir / "tiny-a" / "config.json").read_text())
    edit(raw)
    path = tmp_path / "config.json"
    path.write_text(json.dumps(raw))
    return path


@pytest.mark.parametrize(
    ("edit", "needle"),
    [
        (lambda d: d.update(model_type="llava"), "model_type"),
        (lambda d: d["text_config"].pop("kv_lora_rank"), "text_config.kv_lora_rank"),
        (lambda d: d["vision_config"].update(hidden_size="64"), "vision_config.hidden_size"),
        (lambda d: d["text_config"].update(n_group=3), "n_group"),
        (lambda d: d["text_config"].update(scoring_func="softmax"), "routing"),
        (lambda d: d["text_config"].update(rope_scaling={"type": "dynamic", "factor": 2.0}), "rope_scaling"),
    ],
)
def test_broken_configs_name_the_problem(golden_dir: Path, tmp_path: Path, edit, needle: str) -> None:
    with pytest.raises(CheckpointError) as info:
        KimiVLConfig.from_file(_broken(golden_dir, tmp_path, edit))
    assert needle in info.value.one_line()
    assert "\n" not in info.value.one_line()


def test_unreadable_or_missing_config(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match=r"no config\.json"):
        KimiVLConfig.from_file(tmp_path / "config.json")
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="unreadable"):
        KimiVLConfig.from_file(tmp_path / "config.json")


def test_yarn_scaling_is_parsed() -> None:
    raw = KimiVLConfig().to_dict()["text_config"]
    raw["rope_scaling"] = {
        "type": "yarn",
        "factor": 4.0,
        "original_max_position_embeddings": 32768,
        "mscale_all_dim": 1.0,
    }
    text = TextConfig.from_dict(raw)
    assert text.rope_scaling is not None and text.rope_scaling.factor == 4.0
