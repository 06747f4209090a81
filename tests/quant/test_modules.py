"""Quantized modules, the quantization policy and the quantize-on-load hook."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn

from kimivl_cli.kernels.reference import fused_moe_reference
from kimivl_cli.model.cache import LatentCache
from kimivl_cli.model.config import TextConfig
from kimivl_cli.quant import modules
from kimivl_cli.quant.modules import (
    Int8Linear,
    NF4Experts,
    NF4Linear,
    NF4SwiGLU,
    quantize_linears_,
    quantize_lm_head_,
)
from kimivl_cli.testing.nf4_twins import should_quantize, stacked_nf4_experts
from kimivl_cli.testing.random_nf4 import random_nf4_language_model
from kimivl_cli.weight_formats import NF4Tensor, dequantize_nf4


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("language_model.model.layers.0.self_attn.q_proj.weight", True),
        ("language_model.model.layers.3.self_attn.kv_a_proj_with_mqa.weight", True),
        ("language_model.model.layers.3.self_attn.kv_b_proj.weight", True),
        ("language_model.model.layers.0.mlp.down_proj.weight", True),
        ("language_model.model.layers.5.mlp.shared_experts.up_proj.weight", True),
        ("language_model.model.layers.5.mlp.experts.63.gate_proj.weight", True),
        ("language_model.model.layers.5.mlp.gate.weight", False),  # router
        ("language_model.model.layers.5.mlp.gate.e_score_correction_bias", False),
        ("language_model.model.layers.5.self_attn.kv_a_layernorm.weight", False),
        ("language_model.model.embed_tokens.weight", False),
        ("language_model.lm_head.weight", False),
        ("vision_tower.encoder.blocks.0.mlp.fc0.weight", False),
        ("multi_modal_projector.linear_1.weight", False),
    ],
)
def test_quantization_policy(name: str, expected: bool) -> None:
    assert should_quantize(name) is expected


def test_nf4_linear_matches_dequantised_weight() -> None:
    w = torch.randn(96, 128, dtype=torch.bfloat16) * 0.02
    layer = NF4Linear.from_weight(w)
    x = torch.randn(2, 5, 128, dtype=torch.bfloat16)
    dense = dequantize_nf4(NF4Tensor(layer.packed, layer.absmax, torch.bfloat16))
    assert torch.allclose(layer(x).float(), (x @ dense.t()).float(), rtol=2e-2, atol=2e-2)
    assert layer(x).dtype == torch.bfloat16 and layer(x).shape == (2, 5, 96)
    assert torch.equal(layer.weight.to(torch.bfloat16), dense)  # `.weight` readers (MLA absorbed decode)


def test_int8_linear_close_to_bf16() -> None:
    w = torch.randn(64, 100)
    layer = Int8Linear(100, 64)
    layer.load_weight(w)
    x = torch.randn(3, 100)
    assert (layer(x) - x @ w.t()).norm() / (x @ w.t()).norm() < 0.01


@pytest.mark.parametrize("fused", [True, False])
def test_nf4_experts_forward_on_cpu(cpu_plan, fused: bool) -> None:
    """Few rows per expert: the fused int8-activation kernel (~1% per product); forced to dequantise:
    exactly the NF4 weights' products."""
    cpu_plan(nf4_fused_max_rows=64 if fused else 0, nf4_tiles_max_rows=0)
    torch.manual_seed(0)
    gate, up, down = torch.randn(4, 64, 128) * 0.05, torch.randn(4, 64, 128) * 0.05, torch.randn(4, 128, 64) * 0.05
    experts = stacked_nf4_experts(gate, up, down)
    x, idx, w = torch.randn(3, 128), torch.tensor([[0, 2], [2, 3], [1, 0]]), torch.rand(3, 2)
    dense = [
        dequantize_nf4(NF4Tensor(getattr(experts, f"{p}_packed"), getattr(experts, f"{p}_absmax"), torch.float32))
        for p in ("gate_proj", "up_proj", "down_proj")
    ]
    exact = fused_moe_reference(x, idx, w, *dense)
    got = experts(x, idx, w)
    assert (got - exact).norm() / exact.norm() < 0.03 if fused else torch.allclose(got, exact, atol=1e-5)
    bf16 = fused_moe_reference(x, idx, w, gate, up, down)
    assert (experts(x, idx, w) - bf16).norm() / bf16.norm() < 0.25  # three NF4 matrices, ~0.1 each


class _Experts(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.gate_proj = nn.Parameter(torch.empty(4, 64, 128))
        self.up_proj = nn.Parameter(torch.empty(4, 64, 128))
        self.down_proj = nn.Parameter(torch.empty(4, 128, 64))


class _TinyLM(nn.Module):
    """The module paths of the real language model, two layers."""

    def __init__(self) -> None:
        super().__init__()
        self.model = nn.Module()
        self.model.layers = nn.ModuleList([nn.Module(), nn.Module()])
        for layer in self.model.layers:
            layer.self_attn = nn.Module()
            layer.self_attn.q_proj = nn.Linear(128, 192, bias=False)
            layer.mlp = nn.Module()
        self.model.layers[0].mlp.down_proj = nn.Linear(256, 128, bias=False)
        self.model.layers[1].mlp.experts = _Experts()
        self.model.layers[1].mlp.gate = nn.Linear(128, 4, bias=False)
        self.lm_head = nn.Linear(128, 1000, bias=False)


def test_swap_then_quantize_on_load() -> None:
    with torch.device("meta"):
        lm = _TinyLM()
    quantize_linears_(lm, "nf4", device="cpu")
    layers = lm.model.layers
    assert isinstance(layers[0].self_attn.q_proj, NF4Linear)
    assert isinstance(layers[0].mlp.down_proj, NF4Linear)
    assert isinstance(layers[1].mlp.experts, NF4Experts)
    assert isinstance(layers[1].mlp.gate, nn.Linear) and isinstance(lm.lm_head, nn.Linear)

    w = torch.randn(64, 128)
    layers[1].mlp.experts.load_tensor("2.up_proj.weight", w)  # what the loader does with the official key
    nf4 = stacked_nf4_experts(w.expand(4, 64, 128), w.expand(4, 64, 128), torch.randn(4, 128, 64))
    assert torch.equal(layers[1].mlp.experts.up_proj_packed[2], nf4.up_proj_packed[2])
    q = torch.randn(192, 128)
    layers[1].self_attn.q_proj.load_tensor("weight", q)
    assert torch.equal(layers[1].self_attn.q_proj.packed, NF4Linear.from_weight(q).packed)


def test_int8_mode_keeps_experts_for_the_caller() -> None:
    with torch.device("meta"):
        lm = _TinyLM()
    quantize_linears_(lm, "int8", device="cpu")
    assert isinstance(lm.model.layers[0].self_attn.q_proj, Int8Linear)
    assert isinstance(lm.model.layers[1].mlp.experts, _Experts)


def test_loader_hook_protocol() -> None:
    """model/weights.py hands official suffixes to `load_tensor` for what `checkpoint_tensors` lists."""
    experts = NF4Experts(3, 128, 64)
    keys = experts.checkpoint_tensors()
    assert len(keys) == 9 and keys["2.down_proj.weight"] == (128, 64) and keys["0.gate_proj.weight"] == (64, 128)
    w = torch.randn(128, 64)
    experts.load_tensor("2.down_proj.weight", w)
    assert torch.equal(experts.down_proj_packed[2], NF4Linear.from_weight(w).packed)
    linear = NF4Linear(128, 32)
    assert linear.checkpoint_tensors() == {"weight": (32, 128)}
    w = torch.randn(32, 128)
    linear.load_tensor("weight", w)
    assert torch.equal(linear.absmax, NF4Linear.from_weight(w).absmax)
    assert NF4Linear.param_dtype == NF4Experts.param_dtype == torch.float32


SMALL_MOE = TextConfig(
    vocab_size=512, hidden_size=128, intermediate_size=256, moe_intermediate_size=64, num_hidden_layers=3,
    num_attention_heads=2, kv_lora_rank=64, qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32,
    n_routed_experts=8, n_shared_experts=2, num_experts_per_tok=2,
)  # fmt: skip


@torch.inference_mode()
def test_nf4_decode_dequantises_kv_b_once_per_layer(monkeypatch: pytest.MonkeyPatch, cpu_plan) -> None:
    """Absorbed decode derives its weights from kv_b_proj once, not per token (that was 25% of a
    full-size CPU decode step)."""
    cpu_plan(nf4_fused_max_rows=64)  # the 8-token prefill reads the codes too
    lm = random_nf4_language_model(SMALL_MOE, quantize=True)
    calls: list[tuple[int, ...]] = []
    real = modules.dequantize_cpu
    monkeypatch.setattr(modules, "dequantize_cpu", lambda p, a: (calls.append(tuple(p.shape)), real(p, a))[1])
    cache = LatentCache(SMALL_MOE, 1, 32, torch.bfloat16)
    lm(lm.embed(torch.arange(8)[None]), 0, cache)  # prefill: the expanded path multiplies, it does not dequantise
    for pos in range(8, 12):
        lm(lm.embed(torch.tensor([[pos]])), pos, cache)
    assert calls == [(SMALL_MOE.num_attention_heads * 64, 32)] * SMALL_MOE.num_hidden_layers


def test_swiglu_mlps_become_one_nf4_module() -> None:
    lm = random_nf4_language_model(SMALL_MOE)
    assert isinstance(lm.model.layers[0].mlp, NF4SwiGLU)  # the dense first layer
    assert all(isinstance(layer.mlp.shared_experts, NF4SwiGLU) for layer in lm.model.layers[1:])
    assert isinstance(lm.model.layers[0].mlp.gate_proj, NF4Linear)  # official key paths unchanged


@torch.inference_mode()
def test_nf4_swiglu_one_token_path_matches_three_products() -> None:
    torch.manual_seed(0)
    mlp = NF4SwiGLU(128, 192)
    for proj in (mlp.gate_proj, mlp.up_proj, mlp.down_proj):
        proj.load_weight(torch.randn(proj.out_features, proj.in_features) / proj.in_features**0.5)
    x = torch.randn(4, 1, 128)
    exact = mlp.down_proj(torch.nn.functional.silu(mlp.gate_proj(x)) * mlp.up_proj(x))  # 4 rows: exact fp32
    assert torch.allclose(mlp(x), exact)
    for row in range(4):
        one = mlp(x[row : row + 1])  # the single native call, int8 activations
        assert one.shape == (1, 1, 128)
        assert (one - exact[row]).norm() / exact[row].norm() < 0.03


@pytest.mark.parametrize(("mode", "bound"), [("int8", 0.01), ("nf4", 0.12)])
@torch.inference_mode()
def test_quantized_lm_head_replaces_and_frees_the_bf16_head(mode: str, bound: float) -> None:
    lm = random_nf4_language_model(SMALL_MOE)
    weight = lm.lm_head.weight.clone()
    x = torch.randn(3, SMALL_MOE.hidden_size).to(torch.bfloat16)
    exact = x.float() @ weight.float().t()
    quantize_lm_head_(lm, mode)
    assert not isinstance(lm.lm_head, nn.Linear) and not any(p.numel() for p in lm.lm_head.parameters())
    got = lm.logits(x)
    assert got.dtype == torch.float32 and got.shape == exact.shape
    assert (got - exact).norm() / exact.norm() < bound  # int8 blocks: ~0.6% (activations and weights rounded)


def test_lm_head_kept_in_bf16_or_when_tied() -> None:
    lm = random_nf4_language_model(SMALL_MOE)
    head = lm.lm_head
    quantize_lm_head_(lm, "bf16")
    assert lm.lm_head is head
    lm.config = dataclasses.replace(SMALL_MOE, tie_word_embeddings=True)
    quantize_lm_head_(lm, "int8")
    assert lm.lm_head is head
    with pytest.raises(ValueError, match="lm_head mode"):
        quantize_lm_head_(lm, "fp8")
