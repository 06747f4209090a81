"""The random checkpoint generator writes the official layout, deterministically."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from kimivl_cli.errors import InputError
from kimivl_cli.model.config import KimiVLConfig, TextConfig, VisionConfig
from kimivl_cli.processor.image import ImageProcessorConfig
from kimivl_cli.processor.tokenizer import Tokenizer
from kimivl_cli.testing.checkpoint import (
    SIZES,
    TensorSpec,
    cached_checkpoint,
    count_params,
    main,
    make_checkpoint,
    random_tensor,
)


def expected_shapes(c: KimiVLConfig) -> dict[str, tuple[int, ...]]:
    """The official state dict (the reference's names and shapes), written independently of the generator."""
    v, t = c.vision, c.text
    D, P, F = v.hidden_size, v.patch_size, v.intermediate_size
    out: dict[str, tuple[int, ...]] = {
        "vision_tower.patch_embed.proj.weight": (D, 3, P, P),
        "vision_tower.patch_embed.proj.bias": (D,),
        "vision_tower.patch_embed.pos_emb.weight": (v.init_pos_emb_height, v.init_pos_emb_width, D),
        "vision_tower.encoder.final_layernorm.weight": (D,),
        "vision_tower.encoder.final_layernorm.bias": (D,),
        "multi_modal_projector.pre_norm.weight": (D,),
        "multi_modal_projector.pre_norm.bias": (D,),
        "multi_modal_projector.linear_1.weight": (4 * D, 4 * D),
        "multi_modal_projector.linear_1.bias": (4 * D,),
        "multi_modal_projector.linear_2.weight": (t.hidden_size, 4 * D),
        "multi_modal_projector.linear_2.bias": (t.hidden_size,),
    }
    for b in range(v.num_hidden_layers):
        p = f"vision_tower.encoder.blocks.{b}."
        for norm in ("norm0", "norm1"):
            out[p + norm + ".weight"] = out[p + norm + ".bias"] = (D,)
        out |= {p + "wqkv.weight": (3 * D, D), p + "wqkv.bias": (3 * D,), p + "wo.weight": (D, D), p + "wo.bias": (D,)}
        out |= {p + "mlp.fc0.weight": (F, D), p + "mlp.fc0.bias": (F,), p + "mlp.fc1.weight": (D, F)}
        out[p + "mlp.fc1.bias"] = (D,)
    H, n = t.hidden_size, t.num_attention_heads
    lm = "language_model."
    out[lm + "model.embed_tokens.weight"] = (t.vocab_size, H)
    out[lm + "model.norm.weight"] = (H,)
    out[lm + "lm_head.weight"] = (t.vocab_size, H)

    def mlp(prefix: str, inter: int) -> None:
        out.update({prefix + "gate_proj.weight": (inter, H), prefix + "up_proj.weight": (inter, H)})
        out[prefix + "down_proj.weight"] = (H, inter)

    for i in range(t.num_hidden_layers):
        p = f"{lm}model.layers.{i}."
        out[p + "input_layernorm.weight"] = out[p + "post_attention_layernorm.weight"] = (H,)
        out[p + "self_attn.q_proj.weight"] = (n * (t.qk_nope_head_dim + t.qk_rope_head_dim), H)
        out[p + "self_attn.kv_a_proj_with_mqa.weight"] = (t.kv_lora_rank + t.qk_rope_head_dim, H)
        out[p + "self_attn.kv_a_layernorm.weight"] = (t.kv_lora_rank,)
        out[p + "self_attn.kv_b_proj.weight"] = (n * (t.qk_nope_head_dim + t.v_head_dim), t.kv_lora_rank)
        out[p + "self_attn.o_proj.weight"] = (H, n * t.v_head_dim)
        if i == 0:
            mlp(p + "mlp.", t.intermediate_size)
            continue
        out[p + "mlp.gate.weight"] = (t.n_routed_experts, H)
        out[p + "mlp.gate.e_score_correction_bias"] = (t.n_routed_experts,)
        for e in range(t.n_routed_experts):
            mlp(f"{p}mlp.experts.{e}.", t.moe_intermediate_size)
        mlp(p + "mlp.shared_experts.", t.moe_intermediate_size * t.n_shared_experts)
    return out


def _numel(shape: tuple[int, ...]) -> int:
    return torch.Size(shape).numel()


def test_full_size_parameter_count():
    full = expected_shapes(SIZES["full"])
    assert sum(_numel(s) for s in full.values()) == 16_407_656_048 == count_params(SIZES["full"])
    assert full["language_model.model.layers.1.mlp.shared_experts.gate_proj.weight"] == (2816, 2048)
    real = SIZES["full"]  # the published Kimi-VL config (our config defaults) plus the tokenizer's special ids
    assert real.vision == VisionConfig()
    assert replace(real.text, bos_token_id=None, eos_token_id=None, pad_token_id=None) == TextConfig()
    assert (real.text.bos_token_id, real.text.eos_token_id, real.text.pad_token_id) == (163584, 163585, 163839)
    assert SIZES["full"].media_placeholder_token_id == 163605  # the real id falls out of the layout


def test_dry_run_writes_nothing(tmp_path, capsys):
    assert main([str(tmp_path / "out"), "--size", "full", "--dry-run"]) == 0
    assert "16,407,656,048 parameters, 32.815 GB in bf16" in capsys.readouterr().out
    assert not (tmp_path / "out").exists()
    mid = count_params(SIZES["mid"])
    assert 0.9e9 < mid < 1.3e9 and SIZES["mid"].text.n_routed_experts == 64


@pytest.mark.parametrize("size", ["tiny", "small"])
def test_folder_is_an_official_checkpoint(size):
    folder = cached_checkpoint(size)
    cfg = KimiVLConfig.from_file(folder / "config.json")
    assert cfg == SIZES[size]
    raw = json.loads((folder / "config.json").read_text())
    assert raw["auto_map"]["AutoModelForCausalLM"] == "modeling_kimi_vl.KimiVLForConditionalGeneration"
    assert raw["architectures"] == ["KimiVLForConditionalGeneration"] and raw["text_config"]["num_key_value_heads"]
    assert ImageProcessorConfig.from_file(folder / "preprocessor_config.json") == ImageProcessorConfig.official()

    with safe_open(folder / "model.safetensors", "pt") as f:
        shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118
        assert f.metadata() == {"format": "pt"}
    assert shapes == expected_shapes(cfg)

    tok = Tokenizer.from_dir(folder)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    names = {e["content"]: int(i) for i, e in config["added_tokens_decoder"].items()}
    for name in ("[BOS]", "[EOS]", "<|im_end|>", "<|im_user|>", "<|im_assistant|>", "<|im_system|>", "<|im_middle|>",
                 "<|media_start|>", "<|media_content|>", "<|media_end|>", "<|media_pad|>", "[UNK]", "[PAD]"):  # fmt: skip
        assert tok.encode(name, allow_special=True) == [names[name]] == [tok.token_id(name)]
    base = tok.num_base_tokens
    assert names["[BOS]"] == base and names["<|media_pad|>"] == base + 21 and names["[PAD]"] == base + 255
    assert cfg.media_placeholder_token_id == tok.media_pad_id
    assert (cfg.text.bos_token_id, cfg.text.eos_token_id, cfg.text.pad_token_id) == (
        tok.token_id(tok.names.bos),
        tok.eos_id,
        tok.token_id(tok.names.pad),
    )
    assert cfg.text.vocab_size == base + 256 > max(names.values())
    assert tok.decode(tok.encode("You are a helpful assistant 你好")) == "You are a helpful assistant 你好"
    assert len(tok.encode("You are a helpful assistant")) < 15  # real merges, not bytes


def test_tiny_matches_golden_tiny_a_layout(golden_dir):
    ours = expected_shapes(SIZES["tiny"])
    golden = {k: tuple(v.shape) for k, v in load_file(golden_dir / "tiny-a" / "model.safetensors").items()}
    vocab = {"language_model.model.embed_tokens.weight", "language_model.lm_head.weight"}
    assert ours.keys() == golden.keys() and len(golden) == 120
    assert {k: v for k, v in ours.items() if k not in vocab} == {k: v for k, v in golden.items() if k not in vocab}


def test_sharded_equals_single_and_index_is_consistent(tmp_path):
    single = load_file(cached_checkpoint("tiny") / "model.safetensors")
    folder = make_checkpoint(tmp_path / "sharded", "tiny", seed=0, shards=3)
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert files == [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]
    assert not (folder / "model.safetensors").exists()
    merged: dict[str, torch.Tensor] = {}
    for name in files:
        part = load_file(folder / name)
        assert all(index["weight_map"][k] == name for k in part)
        merged |= part
    assert merged.keys() == single.keys() == index["weight_map"].keys()
    assert all(torch.equal(merged[k], single[k]) for k in single)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in single.values())


def test_deterministic_per_seed_and_dtype(tmp_path):
    a = load_file(make_checkpoint(tmp_path / "a", "tiny", seed=7, dtype="bf16") / "model.safetensors")
    b = load_file(make_checkpoint(tmp_path / "b", "tiny", seed=7, dtype="bf16") / "model.safetensors")
    c = load_file(cached_checkpoint("tiny", seed=0) / "model.safetensors")
    key = "language_model.model.layers.1.mlp.experts.2.up_proj.weight"
    assert all(torch.equal(a[k], b[k]) for k in a) and a[key].dtype == torch.bfloat16
    assert not torch.equal(a[key].float(), c[key])
    spec = TensorSpec(key, tuple(c[key].shape), std=c[key].shape[1] ** -0.5)
    assert torch.equal(random_tensor(spec, seed=0), c[key])


def test_init_keeps_activations_sane():
    w = load_file(cached_checkpoint("small") / "model.safetensors")
    fc0 = w["vision_tower.encoder.blocks.0.mlp.fc0.weight"]
    assert fc0.std().item() == pytest.approx(fc0.shape[1] ** -0.5, rel=0.05)
    norm = w["language_model.model.layers.0.input_layernorm.weight"]
    assert norm.mean().item() == pytest.approx(1.0, abs=0.05)
    x = torch.randn(64, 128)
    for layer in range(4):  # a chain of linears neither explodes nor vanishes
        x = x @ w[f"language_model.model.layers.{layer}.self_attn.o_proj.weight"].T
    assert 0.3 < x.std().item() < 3


def test_refuses_non_empty_folder(tmp_path):
    (tmp_path / "keep.txt").write_text("mine")
    with pytest.raises(InputError, match="not empty"):
        make_checkpoint(tmp_path, "tiny")
    (tmp_path / "model-00001-of-00002.safetensors").write_bytes(b"stale")
    make_checkpoint(tmp_path, "tiny", force=True)
    assert (tmp_path / "keep.txt").read_text() == "mine" and not (
        tmp_path / "model-00001-of-00002.safetensors"
    ).exists()
    run = subprocess.run(
        [sys.executable, "-m", "kimivl_cli.testing.checkpoint", str(tmp_path), "--size", "tiny"],
        capture_output=True,
        text=True,
    )
    assert run.returncode == 2 and run.stderr.startswith("error: ") and run.stderr.count("\n") == 1
