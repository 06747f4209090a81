"""Batch-1 decode on the CPU as one native call per token (`kernels/cpu_decode.c`).

The torch decode step is thousands of small op calls around a few weight-bound products; on a CPU their
overhead rivals the products themselves. `NativeDecoder` describes the loaded language model to the C
step once (pointers to the weights as stored: NF4 codes, int8 blocks, bf16 or fp32, never copies of the
large ones) and then runs a whole token, embedding to logits, in one call. The torch model stays the
reference and serves everything else (prefill, batches, several tokens at once, CUDA).

Built by the engine when the model is loaded (`NativeDecoder.build`: None where the kernels are off, the
plan switches the step off with KIMIVL_CPU_OFF=fused_decode, or a module has a layout the step does not
know, e.g. `--quant int8`'s per-row int8). The description holds the tensors it points into, so it stays
valid as long as the weights are not replaced (the engine never does after loading).
"""

from __future__ import annotations

import ctypes

import torch
from torch import nn

from kimivl_cli.kernels import cpu, native
from kimivl_cli.kernels.routing import DROPPED_GROUP_SCORE, RoutingConfig
from kimivl_cli.model.cache import LatentCache
from kimivl_cli.model.language import FeedForward, LanguageModel, MLAttention, MoE, RoutedExperts
from kimivl_cli.quant.modules import Int8BlockLinear, NF4Experts, NF4Linear, NF4SwiGLU

_NF4, _Q8, _BF16, _F32 = range(4)  # the C step's weight formats
_DENSE = {torch.bfloat16: _BF16, torch.float32: _F32}
_I64, _F, _P = ctypes.c_int64, ctypes.c_float, ctypes.c_void_p
_MAX_CHOICES = 64  # experts per token and expert groups the C step has room for


class _Linear(ctypes.Structure):
    _fields_ = [("fmt", _I64), ("n", _I64), ("k", _I64), ("w", _P), ("scale", _P)]


class _Layer(ctypes.Structure):
    _fields_ = [
        *((name, _P) for name in ("attn_norm", "q_a_norm", "kv_a_norm", "mlp_norm")),
        *((name, _Linear) for name in ("q_a", "q", "kv_a", "kv_b", "o")),
        ("router", _P),
        ("router_bias", _P),
        *((name, _Linear) for name in ("gate", "up", "down", "mlp_gate", "mlp_up", "mlp_down")),
    ]


class _Model(ctypes.Structure):
    _fields_ = [
        *((name, _I64) for name in ("n_layers", "hidden", "heads", "nope", "rope", "v", "rank", "vocab")),
        *((name, _I64) for name in ("experts", "top_k", "n_group", "topk_group", "norm_topk", "embed_fmt", "cache_fmt", "act_bf16")),
        *((name, _F) for name in ("eps", "q_a_eps", "kv_a_eps", "final_eps", "attn_scale", "rope_mscale", "route_scale", "dropped_group_score")),
        ("embed", _P),
        ("inv_freq", _P),
        ("final_norm", _P),
        ("head", _Linear),
        ("layers", _P),
    ]  # fmt: skip


class Unsupported(Exception):
    """A module the native step has no layout for: the engine keeps the torch step."""


class NativeDecoder:
    """`step(token, pos, cache) -> logits [1, V]` fp32 for one token at `pos` attending to slots [0, pos]."""

    def __init__(self, lm: LanguageModel, lib: ctypes.CDLL | None = None) -> None:
        self._lib = lib  # a kernel build (tests run each variant); None: the plan's
        self._keep: list[torch.Tensor] = []  # every tensor the description points into
        cfg = lm.config
        layers = [self._layer(layer) for layer in lm.model.layers]
        self._layers = (_Layer * len(layers))(*layers)
        embed = lm.model.embed_tokens.weight
        router = next((layer.mlp.gate for layer in lm.model.layers if isinstance(layer.mlp, MoE)), None)
        routing = (
            router.routing
            if router is not None
            else RoutingConfig(top_k=0, routed_scaling_factor=1.0, norm_topk_prob=False)
        )
        attn: MLAttention = lm.model.layers[0].self_attn
        first = lm.model.layers[0]
        if attn.rope_dim % 2 or (router is not None and max(routing.top_k, routing.n_group) > _MAX_CHOICES):
            raise Unsupported("odd rope dims, or more experts per token or groups than the C step holds")
        self._model = _Model(
            n_layers=len(layers),
            hidden=cfg.hidden_size,
            heads=attn.n_heads,
            nope=attn.nope_dim,
            rope=attn.rope_dim,
            v=attn.v_dim,
            rank=attn.rank,
            vocab=cfg.vocab_size,
            experts=cfg.n_routed_experts if router is not None else 0,
            top_k=routing.top_k,
            n_group=routing.n_group,
            topk_group=routing.topk_group,
            norm_topk=int(routing.norm_topk_prob),
            embed_fmt=self._dense_format(embed),
            cache_fmt=self._dense_format(embed),
            act_bf16=int(embed.dtype == torch.bfloat16),
            eps=first.input_layernorm.eps,
            q_a_eps=attn.q_a_layernorm.eps if hasattr(attn, "q_a_layernorm") else 0.0,
            kv_a_eps=attn.kv_a_layernorm.eps,
            final_eps=lm.model.norm.eps,
            attn_scale=attn.scale,
            rope_mscale=lm.rotary.mscale,
            route_scale=routing.routed_scaling_factor,
            dropped_group_score=DROPPED_GROUP_SCORE,
            embed=self._ptr(embed),
            inv_freq=self._ptr(lm.rotary.inv_freq(torch.device("cpu"))),
            final_norm=self._vector(lm.model.norm.weight),
            head=self._linear(lm.lm_head),
            layers=ctypes.addressof(self._layers),
        )
        self.dtype = embed.dtype
        self.vocab = cfg.vocab_size

    @classmethod
    def build(cls, lm: LanguageModel) -> NativeDecoder | None:
        """The native step for `lm` on this CPU, or None (kernels off, switched off, or an unknown layout)."""
        if lm.model.embed_tokens.weight.device.type != "cpu" or not native.available():
            return None
        if "fused_decode" in cpu.switched_off():
            return None
        try:
            return cls(lm)
        except Unsupported:
            return None

    def applies(self, tokens: torch.Tensor, positions: torch.Tensor | int, cache: LatentCache, kv_len: int) -> bool:
        """One token of one sequence at an int position inside the cache, attending to exactly the slots
        before it and itself."""
        return (
            tokens.shape == (1, 1)
            and isinstance(positions, int)
            and kv_len == positions + 1 <= cache.capacity
            and cache.buf.shape[1] == 1
            and cache.buf.dtype == self.dtype
            and cache.buf.is_contiguous()
        )

    def step(self, token: int, pos: int, cache: LatentCache) -> torch.Tensor:
        """Writes the token's cache rows at `pos` (the C step trusts these bounds: checked here)."""
        if not (0 <= token < self.vocab and 0 <= pos < cache.capacity):
            raise IndexError(f"token {token} at position {pos} is outside the vocabulary or the cache")
        logits = torch.empty(1, self.vocab, dtype=torch.float32)
        status = native.decode_step(
            ctypes.addressof(self._model),
            token,
            pos,
            cache.buf.data_ptr(),
            cache.buf.stride(0),
            logits.data_ptr(),
            lib=self._lib,
        )
        if status != 0:  # -1; -2 (a shape the C step refuses) is ruled out when the description is built
            raise MemoryError("the native decode step could not allocate its scratch buffers")
        return logits

    # --- the description -------------------------------------------------------------------

    def _ptr(self, t: torch.Tensor) -> int:
        if not t.is_contiguous():
            t = t.contiguous()
        self._keep.append(t)
        return t.data_ptr()

    def _vector(self, t: torch.Tensor) -> int:
        """A norm weight (or bias) as fp32: small, copied once."""
        return self._ptr(t.detach().float())

    @staticmethod
    def _dense_format(t: torch.Tensor) -> int:
        if t.dtype not in _DENSE:
            raise Unsupported(f"{t.dtype} weights")
        return _DENSE[t.dtype]

    def _linear(self, module: nn.Module | None, row_readable: bool = False) -> _Linear:
        """`module`'s weight as stored; row_readable: one the C step can also read row by row (NF4 or dense:
        kv_b, which the absorbed attention reads across its rows)."""
        if module is None:
            return _Linear(_F32, 0, 0, None, None)
        if isinstance(module, NF4Linear):
            return _Linear(
                _NF4, module.out_features, module.in_features, self._ptr(module.packed), self._ptr(module.absmax)
            )
        if isinstance(module, Int8BlockLinear) and not row_readable:
            return _Linear(_Q8, module.out_features, module.in_features, self._ptr(module.q), self._ptr(module.scale))
        if isinstance(module, nn.Linear) and module.bias is None:
            w = module.weight.detach()
            return _Linear(self._dense_format(w), w.shape[0], w.shape[1], self._ptr(w), None)
        raise Unsupported(type(module).__name__)

    def _stacked(self, experts: nn.Module, proj: str) -> _Linear:
        """Routed experts' `proj` as one linear of E x N rows."""
        if isinstance(experts, NF4Experts):
            packed, absmax = experts._weights(proj)
            e, n, half = packed.shape
            return _Linear(_NF4, e * n, half * 2, self._ptr(packed), self._ptr(absmax))
        if isinstance(experts, RoutedExperts):
            w = getattr(experts, proj).detach()
            return _Linear(self._dense_format(w), w.shape[0] * w.shape[1], w.shape[2], self._ptr(w), None)
        raise Unsupported(type(experts).__name__)

    def _swiglu(self, mlp: nn.Module | None) -> dict[str, _Linear]:
        if mlp is not None and not isinstance(mlp, FeedForward | NF4SwiGLU):
            raise Unsupported(type(mlp).__name__)
        return {f"mlp_{p}": self._linear(getattr(mlp, f"{p}_proj", None)) for p in ("gate", "up", "down")}

    def _layer(self, layer: nn.Module) -> _Layer:
        attn: MLAttention = layer.self_attn
        lora = hasattr(attn, "q_a_proj")
        fields = {
            "attn_norm": self._vector(layer.input_layernorm.weight),
            "q_a_norm": self._vector(attn.q_a_layernorm.weight) if lora else None,
            "kv_a_norm": self._vector(attn.kv_a_layernorm.weight),
            "mlp_norm": self._vector(layer.post_attention_layernorm.weight),
            "q_a": self._linear(attn.q_a_proj if lora else None),
            "q": self._linear(attn.q_b_proj if lora else attn.q_proj),
            "kv_a": self._linear(attn.kv_a_proj_with_mqa),
            "kv_b": self._linear(attn.kv_b_proj, row_readable=True),
            "o": self._linear(attn.o_proj),
        }
        if isinstance(layer.mlp, MoE):
            router = layer.mlp.gate
            fields |= {
                "router": self._vector(router.weight),
                "router_bias": self._vector(router.e_score_correction_bias),
                **{p: self._stacked(layer.mlp.experts, f"{p}_proj") for p in ("gate", "up", "down")},
                **self._swiglu(layer.mlp.shared_experts),
            }
        else:
            fields |= self._swiglu(layer.mlp)
        return _Layer(**fields)
