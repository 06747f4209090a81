"""The fused decode step (Triton kernels; interpreter on CPU) computes what the module path does:
logits and the cache row it writes, for NF4 and dense weights, shared experts and grouped routing."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from kimivl_cli.model.cache import LatentCache
from kimivl_cli.model.config import TextConfig
from kimivl_cli.model.fused_decode import FusedDecoder
from kimivl_cli.model.language import LanguageModel
from kimivl_cli.quant.modules import quantize_linears_
from kimivl_cli.testing.nf4_twins import nf4_twins

# Every inner size a multiple of 64 and kv_lora_rank a power of two (what the kernels need); the
# dense first layer's 192 is three 64-blocks, the rest Kimi-VL's layout scaled down.
SMALL = TextConfig(
    vocab_size=256, hidden_size=128, intermediate_size=192, moe_intermediate_size=64, num_hidden_layers=3,
    num_attention_heads=4, kv_lora_rank=64, qk_nope_head_dim=16, qk_rope_head_dim=16, v_head_dim=32,
    n_routed_experts=8, n_shared_experts=2, num_experts_per_tok=2, max_position_embeddings=4096,
)  # fmt: skip
GROUPED = dataclasses.replace(
    SMALL, n_routed_experts=16, num_experts_per_tok=4, n_group=4, topk_group=2, n_shared_experts=1
)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


@torch.no_grad()
def _module_step(lm: LanguageModel, prompt: torch.Tensor, token: int) -> tuple[LatentCache, torch.Tensor, LatentCache]:
    """(cache after the prompt, logits of `token` after it, cache after `token`) on the module path."""
    cfg = lm.config
    cache = LatentCache(cfg, 1, 64, torch.float32)
    lm(lm.embed(prompt), 0, cache)
    before = LatentCache(cfg, 1, 64, torch.float32)
    before.buf.copy_(cache.buf)
    logits = lm.logits(lm(lm.embed(torch.tensor([[token]])), prompt.shape[1], cache)[:, -1])
    return before, logits, cache


@pytest.mark.parametrize(("cfg", "which"), [(SMALL, "nf4"), (GROUPED, "dense")])
@torch.no_grad()
def test_fused_step_equals_the_module_step(cfg: TextConfig, which: str) -> None:
    dense, nf4 = nf4_twins(cfg, seed=1)
    prompt = torch.randint(0, cfg.vocab_size, (1, 7), generator=torch.Generator().manual_seed(2))
    cache, expected, expected_cache = _module_step(dense, prompt, token=5)
    fused = FusedDecoder.build(nf4 if which == "nf4" else dense)
    assert fused is not None
    logits = fused(torch.tensor([[5]]), torch.tensor([[7]]), cache)
    assert logits.shape == (1, cfg.vocab_size) and logits.dtype == torch.float32
    assert _rel(logits, expected) < 1e-5
    torch.testing.assert_close(cache.buf, expected_cache.buf, rtol=1e-5, atol=1e-5)


def test_models_the_kernels_do_not_cover_keep_the_module_path() -> None:
    with torch.device("meta"):
        int8 = quantize_linears_(LanguageModel(SMALL), "int8", device="meta")
        q_lora = LanguageModel(dataclasses.replace(SMALL, q_lora_rank=64))
        narrow = LanguageModel(dataclasses.replace(SMALL, moe_intermediate_size=32))
    assert FusedDecoder.build(int8) is None
    assert FusedDecoder.build(q_lora) is None
    assert FusedDecoder.build(narrow) is None
