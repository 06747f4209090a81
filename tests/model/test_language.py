"""Language-model building blocks: RoPE pairing, absorbed vs expanded MLA, the latent cache,
chunked prefill, expert dispatch paths, grouped routing, and the full-size parameter count."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from kimivl_cli.errors import InputError
from kimivl_cli.kernels import native
from kimivl_cli.kernels.reference import fused_moe_reference
from kimivl_cli.model import cache as cache_mod
from kimivl_cli.model.cache import LatentCache
from kimivl_cli.model.config import KimiVLConfig, RopeScaling, TextConfig
from kimivl_cli.model.hooks import twin
from kimivl_cli.model.language import LanguageModel, RotaryEmbedding, RoutedExperts, Router, apply_rope
from kimivl_cli.model.weights import materialize
from kimivl_cli.testing.checkpoint import load_checkpoint
from kimivl_cli.testing.nf4_twins import stacked_nf4_experts
from kimivl_cli.testing.sync_free import GatheredExperts
from kimivl_cli.weight_formats import NF4Tensor, dequantize_nf4


@pytest.fixture(scope="module")
def tiny_a(golden_dir: Path):
    """tiny-a's language model and its prompt embeddings with the golden image features merged in."""
    folder = golden_dir / "tiny-a"
    cfg = KimiVLConfig.from_file(folder / "config.json")
    with torch.device("meta"):
        lm = LanguageModel(cfg.text)
    materialize(lm, torch.float32, "cpu")
    load_checkpoint(lm, folder, prefix="language_model.")
    golden = load_file(str(folder / "golden.safetensors"))
    ids = golden["input_ids"]
    with torch.no_grad():
        embeds = lm.embed(ids)
        embeds[ids == cfg.media_placeholder_token_id] = golden["projector_out"]
    return lm.eval(), cfg.text, embeds


def test_rope_matches_reference_permute_then_rotate_half() -> None:
    """The reference de-interleaves (x0,x2,..|x1,x3,..) and applies rotate-half with cat(freqs, freqs)."""
    torch.manual_seed(0)
    x = torch.randn(2, 5, 3, 8)
    rope = RotaryEmbedding(8, 800000.0, None)
    cos, sin = rope(torch.arange(5).expand(2, 5))
    perm = x.view(2, 5, 3, 4, 2).transpose(-1, -2).reshape(2, 5, 3, 8)
    c, s = torch.cat((cos, cos), -1)[:, :, None], torch.cat((sin, sin), -1)[:, :, None]
    rotate_half = torch.cat((-perm[..., 4:], perm[..., :4]), -1)
    torch.testing.assert_close(apply_rope(x, cos[:, :, None], sin[:, :, None]), perm * c + rotate_half * s)


def test_yarn_keeps_high_frequencies_and_interpolates_low_ones() -> None:
    scaling = RopeScaling(factor=40.0, original_max_position_embeddings=4096, mscale=1.0, mscale_all_dim=1.0)
    plain, yarn = RotaryEmbedding(64, 10000.0, None), RotaryEmbedding(64, 10000.0, scaling)
    base, scaled = plain.inv_freq(torch.device("cpu")), yarn.inv_freq(torch.device("cpu"))
    torch.testing.assert_close(scaled[:8], base[:8])  # many rotations within 4K: untouched
    torch.testing.assert_close(scaled[-4:], base[-4:] / 40.0)  # few rotations: interpolated
    assert yarn.mscale == 1.0  # mscale == mscale_all_dim cancels on cos/sin...
    cfg = dataclasses.replace(TextConfig(), rope_scaling=scaling)
    with torch.device("meta"):
        lm = LanguageModel(cfg)
    attn = lm.model.layers[0].self_attn  # ...and moves to the softmax scale
    assert attn.scale == pytest.approx(192**-0.5 * (0.1 * math.log(40.0) + 1) ** 2)


@torch.no_grad()
def test_absorbed_attention_equals_expanded(tiny_a) -> None:
    lm, cfg, embeds = tiny_a
    outs = []
    default = lm.model.layers[0].self_attn.absorb_max_tokens
    assert embeds.shape[1] > default  # the prompt takes the expanded path by default
    try:
        for absorb in (0, 10**6):  # force each path over the same cache contents
            for layer in lm.model.layers:
                layer.self_attn.absorb_max_tokens = absorb
            outs.append(lm.logits(lm(embeds, 0, LatentCache(cfg, 1, 64, torch.float32))))
    finally:
        for layer in lm.model.layers:
            layer.self_attn.absorb_max_tokens = default
    torch.testing.assert_close(outs[0], outs[1], atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_cached_decode_equals_full_forward_for_64_steps_with_images(tiny_a) -> None:
    lm, cfg, embeds = tiny_a
    n = embeds.shape[1]
    cache = LatentCache(cfg, 1, n + 64, torch.float32)
    step_logits = [lm.logits(lm(embeds, 0, cache)[:, -1])]
    tokens = []
    for i in range(64):
        tokens.append(step_logits[-1].argmax(-1))
        step_logits.append(lm.logits(lm(lm.embed(tokens[-1][:, None]), n + i, cache)[:, -1]))
    full_embeds = torch.cat((embeds, lm.embed(torch.stack(tokens, 1))), 1)
    full = lm.logits(lm(full_embeds, 0))[0, n - 1 :]
    torch.testing.assert_close(torch.cat(step_logits), full, atol=1e-4, rtol=1e-4)


@torch.no_grad()
def test_chunked_prefill_and_position_tensors_equal_one_pass(tiny_a, monkeypatch) -> None:
    lm, cfg, embeds = tiny_a
    full = lm(embeds, 0)
    monkeypatch.setattr(cache_mod, "ATTN_BLOCK_ELEMENTS", 4 * 20)  # query blocks of 1 row
    cache = LatentCache(cfg, 1, 100, torch.float32)
    chunks = [lm(embeds[:, s : s + 10], s, cache) for s in range(0, embeds.shape[1], 10)]
    torch.testing.assert_close(torch.cat(chunks, 1), full, atol=1e-5, rtol=1e-5)
    # Per-token positions, attention over the whole (masked) cache capacity, two rows in a batch.
    cache2 = LatentCache(cfg, 2, 100, torch.float32)
    pos = torch.arange(embeds.shape[1]).expand(2, -1)
    both = lm(embeds.expand(2, -1, -1), pos, cache2)
    torch.testing.assert_close(both, full.expand(2, -1, -1), atol=1e-5, rtol=1e-5)


def test_cache_holds_only_latent_and_rope_key() -> None:
    cfg = TextConfig(num_hidden_layers=2)
    cache = LatentCache(cfg, batch=1, max_len=16, dtype=torch.bfloat16)
    assert cache.width * cache.buf.element_size() == (512 + 64) * 2
    assert cache.buf.numel() == 2 * 16 * 576
    with pytest.raises(InputError) as err:
        LatentCache(cfg, batch=1, max_len=131073)
    assert "131073" in err.value.one_line() and "131072" in err.value.one_line()


def _random_experts(e: int, d: int, i: int, dtype: torch.dtype = torch.float32) -> RoutedExperts:
    torch.manual_seed(1)
    experts = RoutedExperts(e, d, i)
    for p in experts.parameters():
        torch.nn.init.normal_(p, std=0.2)
    return experts.to(dtype)


def _needs_native(variant: str) -> None:
    if variant in ("native_bf16", "nf4_fused") and not native.available():
        pytest.skip("the native CPU kernels are not built here")


# Every CPU expert path against the plain reference (kernels/reference.py); x [T, D], K=3 of E=8 experts.
# (variant, tokens, relative error bound). The module's forward picks among them by shape and dtype.
EXPERT_PATHS = [
    ("single", 1, 1e-5),  # batch-1 decode, fp32: its K experts in turn
    ("grouped", 1, 1e-5),
    ("grouped", 3, 1e-5),
    ("grouped", 40, 1e-5),  # prefill: sorted by expert, each active expert once
    ("gathered", 3, 1e-5),  # testing/sync_free.py: what a compiled CPU step runs
    ("forward", 1, 1e-5),
    ("forward", 40, 1e-5),
    ("native_bf16", 1, 1e-4),  # bf16 weights, one token: one native call (fp32 sums)
    ("nf4_fused", 1, 3e-2),  # NF4, the native int8-activation kernel (its exact math: tests/kernels)
    ("nf4_fused", 3, 3e-2),
    ("nf4_dequantising", 40, 1e-5),  # NF4, dequantised once per expert: exact fp32 products
]


@pytest.mark.parametrize(("variant", "tokens", "bound"), EXPERT_PATHS)
@torch.no_grad()
def test_every_cpu_expert_path_matches_the_reference(cpu_plan, variant: str, tokens: int, bound: float) -> None:
    _needs_native(variant)
    experts = _random_experts(8, 128, 64, torch.bfloat16 if variant == "native_bf16" else torch.float32)
    gen = torch.Generator().manual_seed(tokens)
    x = torch.randn(tokens, 128, generator=gen)
    idx = torch.stack([torch.randperm(8, generator=gen)[:3] for _ in range(tokens)])
    w = torch.rand(tokens, 3, generator=gen)
    dense = [getattr(experts, p).float() for p in experts.projections]
    if variant == "single":
        got = experts._single(x, idx, w)
    elif variant == "grouped":
        got = experts._grouped(x, idx, w)
    elif variant == "gathered":
        got = twin(experts, GatheredExperts)(x, idx, w)
    elif variant == "native_bf16":
        x = x.bfloat16()
        got = experts(x, idx, w)
    elif variant.startswith("nf4"):
        cpu_plan(nf4_fused_max_rows=tokens * 3 if variant == "nf4_fused" else 0, nf4_tiles_max_rows=0)
        nf4 = stacked_nf4_experts(*dense)
        dense = [dequantize_nf4(NF4Tensor(*nf4._weights(p), torch.float32)) for p in nf4.projections]
        got = nf4(x, idx, w)
    else:
        got = experts(x, idx, w)
    ref = fused_moe_reference(x.float(), idx, w, *dense)
    assert got.shape == ref.shape
    assert ((got.float() - ref).norm() / ref.norm()).item() < bound


def test_grouped_routing_picks_within_the_best_groups() -> None:
    cfg = TextConfig(hidden_size=4, n_routed_experts=8, n_group=4, topk_group=2, num_experts_per_tok=3)
    router = Router(cfg)
    with torch.no_grad():
        router.weight.zero_()
        # Experts 0..7 in groups {0,1},{2,3},{4,5},{6,7}; group sums of top-2 pick groups 1 and 3,
        # although expert 0 alone has the single highest score.
        router.e_score_correction_bias.copy_(torch.tensor([0.9, -0.5, 0.4, 0.4, 0.1, 0.1, 0.35, 0.35]))
    idx, w = router(torch.zeros(1, 4))
    assert sorted(idx[0].tolist())[:2] == [2, 3] and sorted(idx[0].tolist())[2] in (6, 7)
    torch.testing.assert_close(w.sum(), torch.tensor(2.446))  # sigmoid(0) everywhere, renormalised


def test_full_size_language_model_parameter_count() -> None:
    with torch.device("meta"):
        lm = LanguageModel(TextConfig())
    # Spec: 16,407,656,048 in all = LM + vision 416.9M + projector 30.7M (see test_weights for the total).
    n = sum(p.numel() for p in lm.parameters())
    assert round(n / 1e9, 3) == 15.960
