"""The three-launch decode MoE (Triton; interpreter on CPU) against the model's router and the
per-expert reference: shared slots, grouped routing, experts without tokens, dense weights."""

from __future__ import annotations

import pytest
import torch

from kimivl_cli.kernels.moe_decode import (
    MAX_TOKENS,
    ExpertWeights,
    experts_reference,
    moe_decode,
    moe_down,
    moe_gate_up,
    moe_route,
    router_logits_reference,
)
from kimivl_cli.kernels.routing import RoutingConfig
from kimivl_cli.model.config import TextConfig
from kimivl_cli.model.language import Router
from kimivl_cli.weight_formats import quantize_nf4


def experts_given_ids(x: torch.Tensor, idx: torch.Tensor, w: torch.Tensor, experts: ExpertWeights) -> torch.Tensor:
    """The routed experts alone with ids given: the two launches without the routing."""
    act, ids, _ = moe_gate_up(x, experts, RoutingConfig(top_k=idx.shape[1]), idx=idx)
    return moe_down(act, experts, ids, w)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max() / b.float().abs().max())


class Layer:
    """Random experts (NF4 or dense), a shared MLP of `shared` slots and the model's own Router."""

    def __init__(
        self, e: int, k: int, d: int, i: int, shared: int, groups: int = 1, topk_group: int = 1, nf4=True, shift=0.0
    ):
        gen = torch.Generator().manual_seed(e * 100 + k)

        def weight(*shape: int):
            w = torch.randn(*shape, generator=gen) * 0.1
            return (lambda q: (q.packed, q.absmax))(quantize_nf4(w)) if nf4 else w

        extra = (weight(shared * i, d), weight(shared * i, d), weight(d, shared * i)) if shared else ()
        self.experts = ExpertWeights(weight(e, i, d), weight(e, i, d), weight(e, d, i), *extra)
        cfg = TextConfig(
            hidden_size=d, n_routed_experts=e, num_experts_per_tok=k, n_group=groups, topk_group=topk_group
        )
        self.router = Router(cfg).requires_grad_(False)
        self.router.weight.data = torch.randn(e, d, generator=gen) * 0.3
        self.router.e_score_correction_bias.data = 0.1 * torch.randn(e, generator=gen) + shift
        self.routing = RoutingConfig(k, groups, topk_group, cfg.routed_scaling_factor, cfg.norm_topk_prob)
        self.norm = (1 + 0.1 * torch.randn(d, generator=gen), 1e-5)

    def reference(self, h: torch.Tensor) -> torch.Tensor:
        """h + MoE(rmsnorm(h)) the way the model computes it."""
        xn, _ = router_logits_reference(h, self.norm, self.router.weight)
        idx, w = self.router(xn)
        return (h.float() + experts_reference(xn, idx, w, self.experts).float()).to(h.dtype)


# (tokens, experts, top-k, hidden, inter, shared slots, groups, groups kept, bias shift)
CASES = [
    (1, 8, 2, 64, 64, 2, 1, 1, 0.0),  # Kimi-VL's layout: 2 shared slots, ungrouped
    (2, 16, 4, 64, 64, 1, 4, 2, 0.0),  # grouped routing (DeepSeek-V3 style), one shared slot
    (3, 8, 3, 128, 64, 0, 1, 1, 0.0),  # no shared experts; 3 tokens over 8 experts leave some unused
    (1, 8, 4, 64, 64, 0, 4, 2, -1.5),  # every biased score < 0: the 4 dropped experts (0.0) win
]


@pytest.mark.parametrize(("t", "e", "k", "d", "i", "shared", "groups", "kept", "shift"), CASES)
def test_moe_decode_matches_the_model(t, e, k, d, i, shared, groups, kept, shift) -> None:
    layer = Layer(e, k, d, i, shared, groups, kept, shift=shift)
    h = torch.randn(t, d, generator=torch.Generator().manual_seed(t))
    xn, logits = moe_route(h, layer.norm, layer.router.weight, tiles=(8, 1, 1))
    ref_xn, ref_logits = router_logits_reference(h, layer.norm, layer.router.weight)
    torch.testing.assert_close(xn, ref_xn, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(logits, ref_logits, rtol=1e-5, atol=1e-5)
    act, idx, w = moe_gate_up(
        xn, layer.experts, layer.routing, logits=logits, bias=layer.router.e_score_correction_bias
    )
    ref_idx, ref_w = layer.router(ref_xn)
    for row, ref_row, wr, ref_wr in zip(idx.tolist(), ref_idx.tolist(), w.tolist(), ref_w.tolist(), strict=True):
        assert dict(zip(row, wr, strict=True)) == pytest.approx(dict(zip(ref_row, ref_wr, strict=True)), rel=1e-6)
    assert _rel(moe_down(act, layer.experts, idx, w, residual=h), layer.reference(h)) < 1e-5


def test_dense_expert_weights() -> None:
    layer = Layer(8, 2, 64, 64, 2, nf4=False)
    h = torch.randn(2, 64, generator=torch.Generator().manual_seed(3))
    out = moe_decode(
        h, layer.norm, layer.router.weight, layer.router.e_score_correction_bias, layer.routing, layer.experts
    )
    assert _rel(out, layer.reference(h)) < 1e-5


def test_experts_with_ids_given_and_bf16() -> None:
    """The module path (`NF4Experts` with the router's ids) in bf16: bound of a few bf16 ulps, as the
    interpreter rounds fp32 -> bf16 toward zero (a GPU rounds to nearest)."""
    layer = Layer(8, 2, 64, 64, 0)
    x = torch.randn(4, 64, generator=torch.Generator().manual_seed(4))
    idx = torch.tensor([[0, 7], [7, 0], [3, 4], [7, 3]])  # experts 1, 2, 5, 6 get no tokens
    w = torch.rand(4, 2, generator=torch.Generator().manual_seed(5)) + 0.1
    assert _rel(experts_given_ids(x, idx, w, layer.experts), experts_reference(x, idx, w, layer.experts)) < 1e-5
    xb = x.bfloat16()
    assert _rel(experts_given_ids(xb, idx, w, layer.experts), experts_reference(xb, idx, w, layer.experts)) < 5e-2


def test_too_many_tokens_is_refused() -> None:
    layer = Layer(8, 2, 64, 64, 0)
    with pytest.raises(ValueError, match="at most"):
        experts_given_ids(torch.randn(MAX_TOKENS + 1, 64), torch.zeros(MAX_TOKENS + 1, 2, dtype=torch.long),
                    torch.ones(MAX_TOKENS + 1, 2), layer.experts)  # fmt: skip
