"""DeepSeek-V3 / Kimi-VL router (`noaux_tc`): sigmoid scores, bias-corrected group-limited top-k.

Shapes: T tokens, H hidden, E routed experts, G groups, K experts per token.
Everything runs in fp32 (the reference computes the gate logits in fp32) with torch ops
that never read a value back to the host, so decode can be captured in a CUDA graph.
The fused decode kernel (`moe_decode.route_topk`) computes the same thing in Triton.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

# Experts of dropped groups compete with choice score 0.0, not -inf: the reference implementation
# (Kimi-VL's released modelling code, which produced the goldens) writes `masked_fill(~keep, 0.0)`.
# DeepSeek's and vLLM's code write -inf; the two differ only when a kept expert's biased score is
# negative, and then only 0.0 reproduces the checkpoint's own code.
DROPPED_GROUP_SCORE = 0.0


@dataclass(frozen=True)
class RoutingConfig:
    top_k: int = 6
    n_group: int = 1
    topk_group: int = 1
    routed_scaling_factor: float = 2.446
    norm_topk_prob: bool = True


def route(
    x: torch.Tensor, gate_weight: torch.Tensor, bias: torch.Tensor, cfg: RoutingConfig
) -> tuple[torch.Tensor, torch.Tensor]:
    """x [T, H], gate_weight [E, H], bias [E] -> (expert ids [T, K] int64, unordered; weights [T, K] fp32).

    The bias only steers which experts are chosen; the weights are the unbiased sigmoid
    scores of the chosen experts, normalised to sum 1 (if `norm_topk_prob`) and scaled.
    """
    scores = torch.sigmoid(F.linear(x.float(), gate_weight.float()))  # [T, E]
    choice = scores + bias.float()
    if cfg.n_group > 1:
        t, e = choice.shape
        grouped = choice.view(t, cfg.n_group, e // cfg.n_group)  # [T, G, E/G]
        group_score = grouped.topk(2, dim=-1).values.sum(dim=-1)  # [T, G]: sum of each group's best two
        keep = torch.zeros_like(group_score, dtype=torch.bool)
        keep.scatter_(1, group_score.topk(cfg.topk_group, dim=-1, sorted=False).indices, True)
        choice = grouped.masked_fill(~keep[..., None], DROPPED_GROUP_SCORE).view(t, e)
    idx = choice.topk(cfg.top_k, dim=-1, sorted=False).indices  # [T, K]
    weights = scores.gather(1, idx)
    if cfg.top_k > 1 and cfg.norm_topk_prob:
        weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
    return idx, weights * cfg.routed_scaling_factor
