"""An independent second oracle: transformers' own `DeepseekV3ForCausalLM` with the same tiny weights.

transformers is a test dependency only (the CLI never imports it). Its DeepSeek-V3 stores the
routed experts fused (`gate_up_proj` [E, 2I, D]); the config and the fusing are shared with the CPU
benchmark (`kimivl_cli.testing.transformers_twin`), the official keys are read straight from the file here.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from kimivl_cli.model.config import RopeScaling, TextConfig
from kimivl_cli.model.language import LanguageModel
from kimivl_cli.model.weights import load_model, materialize
from kimivl_cli.testing.transformers_twin import deepseek_v3_config, fuse_experts

transformers = pytest.importorskip("transformers")


def hf_state_dict(official: dict[str, torch.Tensor], t: TextConfig) -> dict[str, torch.Tensor]:
    """Official `language_model.*` keys -> transformers 5 keys: the per-expert weights stacked here,
    from the file (not through our loader), then fused as transformers stores them."""
    out = {k.removeprefix("language_model."): v for k, v in official.items() if k.startswith("language_model.")}
    for layer in range(t.num_hidden_layers):
        if not t.is_moe_layer(layer):
            continue
        p = f"model.layers.{layer}.mlp.experts"
        for proj in ("gate_proj", "up_proj", "down_proj"):
            out[f"{p}.{proj}"] = torch.stack([out.pop(f"{p}.{e}.{proj}.weight") for e in range(t.n_routed_experts)])
    return fuse_experts(out)


@pytest.mark.parametrize("name", ["tiny-a", "tiny-b"])
@torch.no_grad()
def test_language_model_matches_transformers_deepseek_v3(name: str, golden_dir: Path) -> None:
    folder = golden_dir / name
    model, cfg = load_model(folder, dtype=torch.float32)
    golden = load_file(str(folder / "golden.safetensors"))
    hf = transformers.DeepseekV3ForCausalLM(deepseek_v3_config(cfg.text)).eval()
    missing, unexpected = hf.load_state_dict(
        hf_state_dict(load_file(str(folder / "model.safetensors")), cfg.text), strict=False
    )
    assert not unexpected and all("rotary" in k for k in missing)
    # Text plus the golden image features as input embeddings, as the full model would feed them.
    embeds = model.embed(golden["input_ids"], golden["projector_out"])
    theirs = hf(inputs_embeds=embeds).logits
    ours = model.language_model.logits(model.language_model(embeds))
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(theirs, golden["logits"], atol=1e-4, rtol=1e-4)  # and both agree with the reference


@torch.no_grad()
def test_yarn_rope_matches_transformers(golden_dir: Path) -> None:
    """The same weights with a DeepSeek YaRN config (factor 4 over an original 16-token context,
    mscale 0.7 vs mscale_all_dim 1.0 so the cos/sin factor and the softmax factor both matter)."""
    folder = golden_dir / "tiny-a"
    model, cfg = load_model(folder, dtype=torch.float32)
    scaling = RopeScaling(factor=4.0, original_max_position_embeddings=16, mscale=0.7, mscale_all_dim=1.0)
    text = dataclasses.replace(cfg.text, rope_scaling=scaling)
    with torch.device("meta"):
        ours = LanguageModel(text)
    materialize(ours, torch.float32, "cpu")
    ours.load_state_dict(model.language_model.state_dict())
    hf = transformers.DeepseekV3ForCausalLM(deepseek_v3_config(text)).eval()  # rope_type yarn
    hf.load_state_dict(hf_state_dict(load_file(str(folder / "model.safetensors")), text), strict=False)
    ids = torch.randint(0, 979, (1, 60), generator=torch.Generator().manual_seed(0))
    embeds = ours.embed(ids)
    torch.testing.assert_close(ours.logits(ours(embeds)), hf(inputs_embeds=embeds).logits, atol=1e-4, rtol=1e-4)
    plain = model.language_model.logits(model.language_model(embeds))
    assert (plain - ours.logits(ours(embeds))).abs().max() > 1e-2  # YaRN really changed something


@torch.no_grad()
def test_q_lora_path_matches_transformers(golden_dir: Path) -> None:
    """DeepSeek-V3's low-rank query (q_a_proj -> q_a_layernorm -> q_b_proj), unused by Kimi-VL."""
    folder = golden_dir / "tiny-a"
    base, cfg = load_model(folder, dtype=torch.float32)
    text = dataclasses.replace(cfg.text, q_lora_rank=24)
    with torch.device("meta"):
        ours = LanguageModel(text)
    materialize(ours, torch.float32, "cpu")
    state = base.language_model.state_dict()
    official = load_file(str(folder / "model.safetensors"))
    g = torch.Generator().manual_seed(3)
    for layer in range(text.num_hidden_layers):
        p = f"model.layers.{layer}.self_attn"
        del state[f"{p}.q_proj.weight"], official[f"language_model.{p}.q_proj.weight"]
        extra = {
            f"{p}.q_a_proj.weight": torch.randn(24, text.hidden_size, generator=g) / 8,
            f"{p}.q_a_layernorm.weight": 1 + torch.randn(24, generator=g) / 10,
            f"{p}.q_b_proj.weight": torch.randn(4 * text.qk_head_dim, 24, generator=g) / 5,
        }
        state.update(extra)
        official.update({f"language_model.{k}": v for k, v in extra.items()})
    ours.load_state_dict(state)
    hf = transformers.DeepseekV3ForCausalLM(deepseek_v3_config(text)).eval()
    missing, unexpected = hf.load_state_dict(hf_state_dict(official, text), strict=False)
    assert not unexpected and all("rotary" in k for k in missing)
    embeds = ours.embed(torch.randint(0, 979, (1, 30), generator=g))
    torch.testing.assert_close(ours.logits(ours(embeds)), hf(inputs_embeds=embeds).logits, atol=1e-4, rtol=1e-4)
