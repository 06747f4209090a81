"""Plain PyTorch MoE, the yardstick for every fused path (and the "naive loop" benchmark).

Shapes: T tokens, H hidden, I expert intermediate, E experts, K experts per token.
One Python iteration per expert that received tokens, reading its rows with a host-side
index: simple and obviously right, but it syncs with the host and is slow on GPUs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def fused_moe_reference(
    x: torch.Tensor,
    idx: torch.Tensor,
    weights: torch.Tensor,
    gate: torch.Tensor,
    up: torch.Tensor,
    down: torch.Tensor,
) -> torch.Tensor:
    """x [T, H], idx/weights [T, K], gate/up [E, I, H], down [E, H, I] -> [T, H] in x.dtype.

    y_t = sum_k weights[t, k] * down_e(silu(gate_e x_t) * up_e x_t), e = idx[t, k],
    accumulated in fp32 like the reference model.
    """
    out = torch.zeros(x.shape[0], x.shape[1], dtype=torch.float32, device=x.device)
    for e in torch.unique(idx).tolist():
        token, slot = torch.nonzero(idx == e, as_tuple=True)
        xe = x[token]
        h = F.silu(xe @ gate[e].to(x.dtype).t()) * (xe @ up[e].to(x.dtype).t())
        ye = h @ down[e].to(x.dtype).t()
        out.index_put_((token,), ye.float() * weights[token, slot].float().unsqueeze(1), accumulate=True)
    return out.to(x.dtype)
