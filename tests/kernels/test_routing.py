"""The model's Router vs a straightforward per-token implementation written from the spec
(dropped groups score 0.0, as in the reference implementation)."""

from __future__ import annotations

import math

import pytest
import torch

from kimivl_cli.kernels.routing import RoutingConfig
from kimivl_cli.model.config import TextConfig
from kimivl_cli.model.language import Router


def _route_one(logits: list[float], bias: list[float], cfg: RoutingConfig) -> dict[int, float]:
    scores = [1 / (1 + math.exp(-v)) for v in logits]
    choice = [s + b for s, b in zip(scores, bias, strict=True)]
    size = len(scores) // cfg.n_group
    groups = [choice[g * size : (g + 1) * size] for g in range(cfg.n_group)]
    group_score = [sum(sorted(g, reverse=True)[:2]) for g in groups]
    kept = sorted(range(cfg.n_group), key=lambda g: -group_score[g])[: cfg.topk_group]
    masked = [c if i // size in kept else 0.0 for i, c in enumerate(choice)]
    chosen = sorted(range(len(masked)), key=lambda i: -masked[i])[: cfg.top_k]
    total = sum(scores[i] for i in chosen) + 1e-20 if cfg.norm_topk_prob and cfg.top_k > 1 else 1.0
    return {i: scores[i] / total * cfg.routed_scaling_factor for i in chosen}


def route(x: torch.Tensor, gate: torch.Tensor, bias: torch.Tensor, cfg: RoutingConfig):
    """The routing the model runs: its Router module with these weights."""
    text = TextConfig(
        hidden_size=gate.shape[1],
        n_routed_experts=gate.shape[0],
        num_experts_per_tok=cfg.top_k,
        n_group=cfg.n_group,
        topk_group=cfg.topk_group,
        routed_scaling_factor=cfg.routed_scaling_factor,
        norm_topk_prob=cfg.norm_topk_prob,
    )
    router = Router(text).requires_grad_(False)
    router.weight.copy_(gate)
    router.e_score_correction_bias.copy_(bias)
    return router(x)


@pytest.mark.parametrize(
    "cfg",
    [
        RoutingConfig(top_k=6),
        RoutingConfig(top_k=8, n_group=4, topk_group=2, routed_scaling_factor=1.5),
        RoutingConfig(top_k=1, n_group=8, topk_group=3, routed_scaling_factor=1.0),
        RoutingConfig(top_k=4, norm_topk_prob=False),
    ],
)
def test_route_matches_straightforward_version(cfg: RoutingConfig) -> None:
    torch.manual_seed(cfg.top_k)
    x = torch.randn(9, 32, dtype=torch.bfloat16)
    gate = torch.randn(64, 32, dtype=torch.bfloat16) * 0.3
    bias = torch.randn(64) * 0.5
    idx, weights = route(x, gate, bias, cfg)
    assert idx.shape == weights.shape == (9, cfg.top_k)
    logits = x.float() @ gate.float().t()
    for t in range(9):
        expected = _route_one(logits[t].tolist(), bias.tolist(), cfg)
        got = dict(zip(idx[t].tolist(), weights[t].tolist(), strict=True))
        assert got.keys() == expected.keys()
        for e, w in expected.items():
            assert got[e] == pytest.approx(w, rel=1e-5)


def test_normalised_weights_sum_to_scaling_factor() -> None:
    cfg = RoutingConfig(top_k=6, routed_scaling_factor=2.446)
    _, weights = route(torch.randn(5, 16), torch.randn(64, 16), torch.zeros(64), cfg)
    assert torch.allclose(weights.sum(-1), torch.full((5,), 2.446))


def test_bias_steers_choice_but_not_weights() -> None:
    cfg = RoutingConfig(top_k=2, routed_scaling_factor=1.0)
    x, gate = torch.randn(1, 8), torch.randn(4, 8)
    bias = torch.tensor([0.0, 0.0, 100.0, 100.0])
    idx, weights = route(x, gate, bias, cfg)
    assert sorted(idx[0].tolist()) == [2, 3]
    scores = torch.sigmoid(x @ gate.t())[0, 2:]
    assert torch.allclose(weights[0].sort().values, (scores / scores.sum()).sort().values)


def test_dropped_groups_score_zero_as_in_the_reference() -> None:
    """Both groups' biased scores are negative; group 0 is kept, yet its experts lose to group 1's,
    which the reference masks to 0.0 (a -inf mask would pick experts 0 and 1)."""
    cfg = RoutingConfig(top_k=2, n_group=2, topk_group=1, routed_scaling_factor=1.0)
    gate = torch.zeros(4, 8)  # every score is sigmoid(0) = 0.5
    bias = torch.tensor([-0.9, -0.9, -2.0, -2.0])  # choice [-0.4, -0.4, -1.5, -1.5]
    idx, weights = route(torch.randn(3, 8), gate, bias, cfg)
    expected = _route_one([0.0] * 4, bias.tolist(), cfg)
    assert sorted(expected) == [2, 3]
    assert [sorted(row) for row in idx.tolist()] == [[2, 3]] * 3
    assert torch.allclose(weights, torch.full((3, 2), 0.5))
