"""The batch-1 decode step of `LanguageModel` as fused Triton kernels: 8 launches per layer.

Legend: D hidden, H heads, R kv_lora_rank, Dr rope dim, V vocab. One token at a time:

    x = embed(token)                                          1 launch
    per layer:
      q, kv = [q_proj | kv_a_proj](rmsnorm(x))                1   kernels/gemv.py (stacked)
      a = absorbed MLA over the cache rows in use             3   kernels/mla_decode.py
      h = x + o_proj(a)                                       1   kernels/gemv.py (residual)
      x = h + MoE(rmsnorm(h))  (routed + shared experts)      3   kernels/moe_decode.py
       or h + down(silu(gate(rmsnorm(h))) * up(...))          2   (the dense first layer)
    logits = lm_head(rmsnorm(x)) in fp32                      1

Every norm, residual add, RoPE, routing and the sum over experts happens inside those kernels,
so a step of the real model is 217 launches (the module path: ~1,900) and reads each weight once. The attention reads the cache only up to the token's position, which the kernels
read on the device: the step has static shapes and no host sync, so it is captured in a CUDA
graph over a cache of any length. Weights are used in place (NF4 or dense, as loaded).

`FusedDecoder.build(lm)` takes the modules as loaded and returns None for what the kernels do
not cover (int8 weights, a q_lora_rank, sizes that are not 64-blocks); the engine then keeps the
module path. Rounding follows the module path op by op, except that routed and shared expert
outputs add in one fp32 sum (see kernels/moe_decode.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from kimivl_cli.kernels.gemv import Norm, Weight, gemv, gemv_stacked, gemv_swiglu
from kimivl_cli.kernels.mla_decode import MLALayer, MLAShape, mla_decode
from kimivl_cli.kernels.moe_decode import ExpertWeights, moe_decode
from kimivl_cli.kernels.routing import RoutingConfig
from kimivl_cli.model.cache import LatentCache
from kimivl_cli.model.language import (
    FeedForward,
    LanguageModel,
    MLAttention,
    MoE,
    RMSNorm,
    RotaryEmbedding,
    RoutedExperts,
)
from kimivl_cli.quant.modules import NF4Experts, NF4Linear, NF4SwiGLU
from kimivl_cli.weight_formats import BLOCKSIZE

_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


class Unsupported(Exception):
    """A module the fused kernels do not cover (the module path runs instead)."""


def _weight(linear: nn.Module) -> Weight:
    if isinstance(linear, NF4Linear):
        return linear.packed, linear.absmax
    if isinstance(linear, nn.Linear) and linear.bias is None:
        if linear.in_features % BLOCKSIZE:
            raise Unsupported(f"inner size {linear.in_features} is not a multiple of {BLOCKSIZE}")
        return linear.weight
    raise Unsupported(f"{type(linear).__name__} weights")


def _norm(norm: RMSNorm) -> Norm:
    return norm.weight, norm.eps


def _mlp(mlp: nn.Module) -> tuple[Weight, Weight, Weight]:
    if not isinstance(mlp, FeedForward | NF4SwiGLU):
        raise Unsupported(type(mlp).__name__)
    return _weight(mlp.gate_proj), _weight(mlp.up_proj), _weight(mlp.down_proj)


def _experts(moe: MoE) -> ExpertWeights:
    experts = moe.experts
    if isinstance(experts, NF4Experts):
        stacks = [(getattr(experts, f"{p}_packed"), getattr(experts, f"{p}_absmax")) for p in experts.projections]
    elif isinstance(experts, RoutedExperts):
        stacks = [getattr(experts, p) for p in experts.projections]
    else:
        raise Unsupported(type(experts).__name__)
    shared = _mlp(moe.shared_experts) if moe.shared_experts is not None else ()
    weights = ExpertWeights(*stacks, *shared)
    if len({isinstance(w, tuple) for w in (*stacks, *shared)}) > 1:
        raise Unsupported("routed and shared experts in different formats")
    if weights.inter % BLOCKSIZE or (shared and _rows(shared[0]) % weights.inter):
        raise Unsupported(f"expert width {weights.inter} is not a multiple of {BLOCKSIZE}")
    return weights


def _rows(w: Weight) -> int:
    return (w[0] if isinstance(w, tuple) else w).shape[-2]


@dataclass
class _Layer:
    attn_norm: Norm
    q_proj: Weight
    kv_a: Weight
    mla: MLALayer
    o_proj: Weight
    mlp_norm: Norm
    mlp: tuple[Weight, Weight, Weight] | None = None  # a dense layer's gate, up, down
    router: torch.Tensor | None = None  # a MoE layer's router [E, D] fp32, bias [E], settings, experts
    bias: torch.Tensor | None = None
    routing: RoutingConfig | None = None
    experts: ExpertWeights | None = None


def _layer(layer: nn.Module, rotary: RotaryEmbedding, inv_freq: torch.Tensor) -> _Layer:
    attn: MLAttention = layer.self_attn
    if attn.q_lora:
        raise Unsupported("a q_lora_rank (q_a_proj / q_b_proj)")
    if attn.rank % BLOCKSIZE or attn.rank & (attn.rank - 1):
        raise Unsupported(f"kv_lora_rank {attn.rank} is not a power of two >= {BLOCKSIZE}")
    shape = MLAShape(attn.n_heads, attn.rank, attn.nope_dim, attn.rope_dim, attn.v_dim, attn.scale)
    mla = MLALayer(_norm(attn.kv_a_layernorm), _weight(attn.kv_b_proj), inv_freq, rotary.mscale, shape)
    out = _Layer(
        _norm(layer.input_layernorm),
        _weight(attn.q_proj),
        _weight(attn.kv_a_proj_with_mqa),
        mla,
        _weight(attn.o_proj),
        _norm(layer.post_attention_layernorm),
    )
    if isinstance(layer.mlp, MoE):
        gate = layer.mlp.gate
        out.router, out.bias = gate.weight, gate.e_score_correction_bias
        out.routing = gate.routing
        out.experts = _experts(layer.mlp)
        if gate.weight.shape[0] % gate.routing.n_group:
            raise Unsupported("experts that do not split into equal groups")
    else:
        out.mlp = _mlp(layer.mlp)
    return out


class FusedDecoder:
    """`decode(tokens [1, 1], positions [1, 1], cache) -> fp32 logits [1, V]`, writing the token's
    cache rows: what `Engine.decode_step` computes for one token, in 8 launches per layer."""

    def __init__(self, lm: LanguageModel) -> None:
        self.embed = lm.model.embed_tokens.weight
        if self.embed.dtype not in _DTYPES or lm.config.hidden_size % BLOCKSIZE:
            raise Unsupported(f"{self.embed.dtype} activations of width {lm.config.hidden_size}")
        inv_freq = lm.rotary.inv_freq(self.embed.device)  # fixed by the config: computed once
        self.layers = [_layer(layer, lm.rotary, inv_freq) for layer in lm.model.layers]
        self.final_norm = _norm(lm.model.norm)
        self.lm_head = _weight(lm.lm_head)

    @classmethod
    def build(cls, lm: LanguageModel) -> FusedDecoder | None:
        try:
            return cls(lm)
        except Unsupported:
            return None

    def __call__(self, tokens: torch.Tensor, positions: torch.Tensor, cache: LatentCache) -> torch.Tensor:
        position = positions.view(1)
        x = F.embedding(tokens.view(1), self.embed)  # [1, D]
        for i, layer in enumerate(self.layers):
            q, kv = gemv_stacked(x, layer.q_proj, layer.kv_a, norm=layer.attn_norm)
            a = mla_decode(q[0], kv[0], position, cache.buf[i, 0], layer.mla)
            h = gemv(a[None], layer.o_proj, residual=x)
            if layer.experts is not None:
                x = moe_decode(h, layer.mlp_norm, layer.router, layer.bias, layer.routing, layer.experts)
            else:
                gate, up, down = layer.mlp
                x = gemv(gemv_swiglu(h, gate, up, norm=layer.mlp_norm), down, residual=h)
        return gemv(x, self.lm_head, norm=self.final_norm, out_dtype=torch.float32)
