"""The DeepSeek-V3 decoder of Kimi-VL: MLA attention, a dense first layer, then sigmoid-routed MoE.

Module and parameter names equal the official checkpoint keys minus `language_model.`, except the
routed experts, which are stacked per layer (`mlp.experts.gate_proj` [E, I, D]) so one kernel can
serve all of them; `RoutedExperts` maps the official per-expert keys onto the stacks on load.

Paths are chosen once, when the loader knows the device (`DevicePaths.placed`, called by
`model/weights.materialize`): the modules as built run on CPU; on CUDA the routed experts become
`TritonExperts` and the others drop their CPU-only kernels and fp32 upcasts. Forwards never read
the device.

Legend: B batch, T tokens, L attended keys, D hidden, H heads, Dn/Dr/Dv nope/rope/value head dims,
R kv_lora_rank, W = R + Dr cache row, E experts, K experts per token, I expert intermediate.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kimivl_cli.kernels import native
from kimivl_cli.kernels.moe_cpu import linear, moe_cpu
from kimivl_cli.kernels.routing import RoutingConfig, route
from kimivl_cli.model.cache import LatentCache, attend, attend_shared
from kimivl_cli.model.config import MLP_PROJECTIONS, RopeScaling, TextConfig
from kimivl_cli.model.hooks import DevicePaths, KeepsDtype, OwnsCheckpointKeys, twin


def _native_bf16(x: Tensor, *weights: Tensor) -> bool:
    """One token (of CPU tensors) with bf16 weights and the native kernels: the fused expert/MLP call applies."""
    return x.shape[0] == 1 and all(w.dtype == torch.bfloat16 for w in weights) and native.available()


class Linear(nn.Linear, DevicePaths):
    """Bias-free `nn.Linear`: through `linear` on CPU, `F.linear` on CUDA; quantization swaps it like any
    nn.Linear."""

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__(in_features, out_features, bias=False)
        self.cpu_kernels = True

    def placed(self, device: torch.device) -> Linear:
        self.cpu_kernels = device.type == "cpu"
        return self

    def forward(self, x: Tensor, out_dtype: torch.dtype | None = None) -> Tensor:
        if self.cpu_kernels:
            return linear(x, self.weight, out_dtype)
        return F.linear(x, self.weight).to(out_dtype or x.dtype)


class RMSNorm(nn.Module):
    """x * rsqrt(mean(x²) + eps) in fp32, cast to the weight's dtype, then scaled (the reference's order;
    the reference casts to x's dtype, the same except for an fp32 residual stream in a bf16 model)."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.empty(dim))

    def forward(self, x: Tensor) -> Tensor:
        return self.weight * F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps).to(self.weight.dtype)


def _yarn_mscale(factor: float, mscale: float) -> float:
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


class RotaryEmbedding(nn.Module):
    """cos/sin of position x inv_freq for the Dr rope dims, with DeepSeek YaRN when configured.

    No buffers: the 32 frequencies are recomputed on the positions' device each call (cheap, and
    the model can be built on the meta device and stay valid inside a captured CUDA graph).
    """

    def __init__(self, dim: int, theta: float, scaling: RopeScaling | None) -> None:
        super().__init__()
        self.dim, self.theta, self.scaling = dim, theta, scaling
        # YaRN scales cos/sin by mscale(factor, mscale) / mscale(factor, mscale_all_dim).
        self.mscale = (
            1.0
            if scaling is None
            else _yarn_mscale(scaling.factor, scaling.mscale) / _yarn_mscale(scaling.factor, scaling.mscale_all_dim)
        )

    def inv_freq(self, device: torch.device) -> Tensor:
        exponent = torch.arange(0, self.dim, 2, dtype=torch.float32, device=device) / self.dim
        extrapolated = 1.0 / (self.theta**exponent)  # [Dr/2]
        s = self.scaling
        if s is None:
            return extrapolated

        # YaRN: keep high frequencies (few rotations over the original context), interpolate low
        # ones by `factor`, with a linear ramp between the two correction dims.
        def correction_dim(rotations: float) -> float:
            return (
                self.dim
                * math.log(s.original_max_position_embeddings / (rotations * 2 * math.pi))
                / (2 * math.log(self.theta))
            )

        low = max(math.floor(correction_dim(s.beta_fast)), 0)
        high = min(math.ceil(correction_dim(s.beta_slow)), self.dim - 1)
        high = high + 0.001 if low == high else high
        ramp = ((torch.arange(self.dim // 2, dtype=torch.float32, device=device) - low) / (high - low)).clamp(0, 1)
        keep = 1.0 - ramp
        return extrapolated / s.factor * (1 - keep) + extrapolated * keep

    def forward(self, positions: Tensor) -> tuple[Tensor, Tensor]:
        """positions [B, T] -> cos, sin [B, T, Dr/2] in fp32."""
        freqs = positions.float()[..., None] * self.inv_freq(positions.device)
        return freqs.cos() * self.mscale, freqs.sin() * self.mscale


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate adjacent pairs (x[2j], x[2j+1]) by angle j, leaving the result de-interleaved
    ([rotated evens | rotated odds]) exactly like the reference. q and k share the layout, so q·k
    is standard interleaved RoPE. x [..., Dr], cos/sin broadcastable to [..., Dr/2]."""
    pairs = x.float().unflatten(-1, (-1, 2))
    a, b = pairs[..., 0], pairs[..., 1]
    return torch.cat((a * cos - b * sin, b * cos + a * sin), dim=-1).to(x.dtype)


class FeedForward(nn.Module, DevicePaths):
    """SwiGLU MLP: down(silu(gate(x)) * up(x)); the dense layers and the shared experts. On CPU one
    bf16 token is one native call (`fused_one_token`)."""

    def __init__(self, dim: int, inter: int) -> None:
        super().__init__()
        self.gate_proj = Linear(dim, inter)
        self.up_proj = Linear(dim, inter)
        self.down_proj = Linear(inter, dim)
        self.fused_one_token = True

    def placed(self, device: torch.device) -> FeedForward:
        self.fused_one_token = device.type == "cpu"
        return self

    def forward(self, x: Tensor) -> Tensor:
        weights = (self.gate_proj.weight, self.up_proj.weight, self.down_proj.weight)
        flat = x.reshape(-1, x.shape[-1])
        if self.fused_one_token and _native_bf16(flat, *weights):  # one native call: gate, up, SiLU·mul, down
            one = torch.zeros(1, dtype=torch.int64)
            out = native.bf16_moe_decode(flat[0], one, torch.ones(1), *(w[None] for w in weights))
            return out.to(x.dtype).view(x.shape)
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Chunk(NamedTuple):
    """Where the tokens of one forward sit, the same for every layer (`LanguageModel` builds it once)."""

    rope: tuple[Tensor, Tensor]  # cos, sin [B, T, Dr/2]
    positions: Tensor  # [B, T]
    start: int | None  # the start position when the chunk is contiguous (cheaper cache write), else None
    cache: LatentCache | None
    kv_len: int  # attention sees cache slots [0, kv_len)


class MLAttention(nn.Module, DevicePaths):
    """Multi-head latent attention.

    Each token projects to a latent c (R) plus one rope key k_pe (Dr) shared by all heads;
    kv_b_proj expands c to per-head k_nope (Dn) and v (Dv). Two ways to attend:
    - expanded (prefill): expand k/v of all L visible keys, SDPA in query blocks. O(L·H·(Dn+Dv)) transient.
    - absorbed (decode, short chunks over a cache): fold kv_b's key half into the query and its value
      half into the output, and attend straight over the cached rows [c | k_pe] as one shared head.
      The cache is never re-expanded: per step O(H·L·W) work and no k/v tensors at all.
    """

    def __init__(self, cfg: TextConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.n_heads, self.rank = cfg.num_attention_heads, cfg.kv_lora_rank
        self.nope_dim, self.rope_dim, self.v_dim = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim
        q_out = self.n_heads * cfg.qk_head_dim
        self.q_lora = cfg.q_lora_rank is not None
        if not self.q_lora:
            self.q_proj = Linear(cfg.hidden_size, q_out)
        else:
            self.q_a_proj = Linear(cfg.hidden_size, cfg.q_lora_rank)
            self.q_a_layernorm = RMSNorm(cfg.q_lora_rank, eps=1e-6)  # the reference ignores rms_norm_eps here
            self.q_b_proj = Linear(cfg.q_lora_rank, q_out)
        self.kv_a_proj_with_mqa = Linear(cfg.hidden_size, self.rank + self.rope_dim)
        self.kv_a_layernorm = RMSNorm(self.rank, eps=1e-6)  # likewise 1e-6, as in the reference
        self.kv_b_proj = Linear(self.rank, self.n_heads * (self.nope_dim + self.v_dim))
        self.o_proj = Linear(self.n_heads * self.v_dim, cfg.hidden_size)
        self.scale = cfg.qk_head_dim**-0.5
        if cfg.rope_scaling is not None and cfg.rope_scaling.mscale_all_dim:
            self.scale *= _yarn_mscale(cfg.rope_scaling.factor, cfg.rope_scaling.mscale_all_dim) ** 2
        # Absorbed attention works in dims (R + Dr) for scores and R for values instead of (Dn + Dr)
        # and Dv: T·H·L·(2R - Dn - Dv) extra flops, against L·H·R·(Dn + Dv) to re-expand k/v.
        # Absorb while that is cheaper (chunks of up to 169 tokens for the real model).
        absorbed_extra = 2 * self.rank - self.nope_dim - self.v_dim
        self.absorb_max_tokens = max(1, self.rank * (self.nope_dim + self.v_dim) // max(absorbed_extra, 1) - 1)
        self._absorbed_weights: tuple[Tensor, Tensor] | None = None  # see `_absorb_weights`
        # The absorbed path's dtype, None for the input's: fp32 on CPU (see `_absorbed`).
        self.absorbed_dtype: torch.dtype | None = torch.float32

    def placed(self, device: torch.device) -> MLAttention:
        self.absorbed_dtype = torch.float32 if device.type == "cpu" else None
        return self

    def _absorb_weights(self, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """kv_b_proj's weight split for the absorbed path: w_uk [H, Dn, R], w_uvᵀ [H, R, Dv] in `dtype`.

        A plain Linear whose weight is already in `dtype` gives views (no copy). Otherwise (a
        quantized kv_b_proj, whose `.weight` dequantises, or bf16 weights computed in fp32 on CPU)
        the split is made once, on the first absorbed step after loading, and kept: decode would
        otherwise dequantise H*(Dn+Dv)*R weights per layer per token (56.6M per token for the real
        model; docs/performance.md). Cost: those weights once in `dtype`, 113 MB in bf16 for the real model
        (1% of its 9.95 GB NF4 footprint), twice that in fp32 on CPU. Keeping kv_b_proj unquantised
        instead would put the computed footprint at 10.03 GB, over the 10 GB budget, and slow
        prefill's expanded path on nothing. The cache assumes weights are not reloaded after the first step.
        """
        if isinstance(self.kv_b_proj, nn.Linear) and self.kv_b_proj.weight.dtype == dtype:
            return self._split_kv_b(self.kv_b_proj.weight)
        if self._absorbed_weights is None or self._absorbed_weights[0].dtype != dtype:
            w_uk, w_uv = self._split_kv_b(self.kv_b_proj.weight.to(dtype))  # .weight dequantises: only here
            self._absorbed_weights = (w_uk.contiguous(), w_uv.contiguous())
        return self._absorbed_weights

    def _split_kv_b(self, weight: Tensor) -> tuple[Tensor, Tensor]:
        w = weight.view(self.n_heads, self.nope_dim + self.v_dim, self.rank)
        return w[:, : self.nope_dim], w[:, self.nope_dim :].transpose(1, 2)

    def _query(self, x: Tensor) -> Tensor:
        if not self.q_lora:
            return self.q_proj(x)
        return self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))

    def forward(self, x: Tensor, chunk: Chunk) -> Tensor:
        """x [B, T, D] at `chunk`'s positions -> [B, T, D]."""
        B, T, _ = x.shape
        (cos, sin), positions, start, cache, kv_len = chunk
        q = self._query(x).view(B, T, self.n_heads, -1)
        q_nope, q_pe = q.split([self.nope_dim, self.rope_dim], dim=-1)
        latent, k_pe = self.kv_a_proj_with_mqa(x).split([self.rank, self.rope_dim], dim=-1)
        # the shared rope key rotates with the query heads as one more head: [B, T, H+1, Dr]
        pe = apply_rope(torch.cat((q_pe, k_pe[:, :, None]), dim=2), cos[:, :, None], sin[:, :, None])
        q_pe = pe[:, :, : self.n_heads]
        rows = torch.cat((self.kv_a_layernorm(latent), pe[:, :, self.n_heads]), dim=-1)  # [B, T, W]
        if cache is None:
            keys, k_pos = rows, positions
        else:
            if cache.width != rows.shape[-1] or cache.buf.dtype != rows.dtype:
                raise ValueError(
                    f"cache rows are {cache.width} x {cache.buf.dtype}, this layer makes {rows.shape[-1]} x {rows.dtype}"
                )
            keys = cache.update(self.layer_idx, rows, positions if start is None else start, kv_len)
            k_pos = torch.arange(kv_len, device=x.device)[None]
        if cache is not None and x.shape[1] <= self.absorb_max_tokens:
            out = self._absorbed(q_nope, q_pe, keys, positions, k_pos)
        else:
            out = self._expanded(q_nope, q_pe, keys, positions, k_pos)
        return self.o_proj(out.flatten(2))

    def _expanded(self, q_nope: Tensor, q_pe: Tensor, keys: Tensor, q_pos: Tensor, k_pos: Tensor) -> Tensor:
        """q_nope [B, T, H, Dn], q_pe [B, T, H, Dr], keys [B, L, W]: rebuild per-head k/v from the
        latents and attend. -> [B, T, H, Dv]."""
        B, L, _ = keys.shape
        latent, k_pe = keys.split([self.rank, self.rope_dim], dim=-1)
        k_nope, v = self.kv_b_proj(latent).view(B, L, self.n_heads, -1).split([self.nope_dim, self.v_dim], dim=-1)
        k = torch.cat((k_nope, k_pe[:, :, None].expand(B, L, self.n_heads, self.rope_dim)), dim=-1)
        q = torch.cat((q_nope, q_pe), dim=-1)
        out = attend(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), q_pos, k_pos, self.scale)
        return out.transpose(1, 2)

    def _absorbed(self, q_nope: Tensor, q_pe: Tensor, keys: Tensor, q_pos: Tensor, k_pos: Tensor) -> Tensor:
        """q·k = (q_nope W_uk)·c + q_pe·k_pe and attn·v = (attn·c) W_uvᵀ: attend over cache rows.

        Half precision on CPU computes this in fp32 (small strided bf16 bmms are slower than fp32 ones
        on CPUs without native bf16 math, the weights are small, and it saves rounding q and the output
        twice): work O(H·T·(Dn·R + L·W)).
        """
        B, T, H, _ = q_nope.shape
        dtype = self.absorbed_dtype or q_nope.dtype
        w_uk, w_uv_t = self._absorb_weights(dtype)  # [H, Dn, R], [H, R, Dv]
        q_lat = torch.matmul(q_nope.to(dtype).transpose(1, 2), w_uk)  # [B, H, T, R]
        q = torch.cat((q_lat, q_pe.transpose(1, 2).to(dtype)), dim=-1).reshape(B, H * T, -1)  # heads share keys
        rows_pos = q_pos[:, None, :].expand(B, H, T).reshape(B, H * T)
        o = attend_shared(q, keys.to(dtype), self.rank, rows_pos, k_pos, self.scale)  # [B, H*T, R]
        return torch.matmul(o.view(B, H, T, self.rank), w_uv_t).transpose(1, 2).to(q_nope.dtype)  # [B, T, H, Dv]


class Router(nn.Module, KeepsDtype):
    """Sigmoid gate with bias-corrected, group-limited top-k (DeepSeek-V3 `noaux_tc`).

    Kept in fp32 whatever the model dtype (`param_dtype`): routing is discrete, a rounding
    flip changes which experts run, and the gate is tiny (E x D).
    """

    param_dtype = torch.float32

    def __init__(self, cfg: TextConfig) -> None:
        super().__init__()
        self.routing = RoutingConfig(
            cfg.num_experts_per_tok, cfg.n_group, cfg.topk_group, cfg.routed_scaling_factor, cfg.norm_topk_prob
        )
        self.weight = nn.Parameter(torch.empty(cfg.n_routed_experts, cfg.hidden_size))
        self.e_score_correction_bias = nn.Parameter(torch.empty(cfg.n_routed_experts))

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """x [T, D] -> expert ids [T, K] (unordered) and their fp32 weights [T, K]."""
        return route(x, self.weight, self.e_score_correction_bias, self.routing)


class RoutedExperts(nn.Module, OwnsCheckpointKeys, DevicePaths):
    """E SwiGLU experts stored as stacks: gate/up [E, I, D], down [E, D, I], run on CPU.

    The one place that runs experts, so a fused kernel (`TritonExperts` on CUDA, or an NF4 module
    with the same layout and loader hooks) can replace it. Official keys `E.gate_proj.weight` etc.
    land in row E of the stacks.
    """

    projections = MLP_PROJECTIONS

    def __init__(self, n_experts: int, dim: int, inter: int) -> None:
        super().__init__()
        self.gate_proj = nn.Parameter(torch.empty(n_experts, inter, dim))
        self.up_proj = nn.Parameter(torch.empty(n_experts, inter, dim))
        self.down_proj = nn.Parameter(torch.empty(n_experts, dim, inter))

    def checkpoint_tensors(self) -> dict[str, torch.Size]:
        """Official per-expert key suffixes and shapes this module loads."""
        return {
            f"{e}.{proj}.weight": getattr(self, proj).shape[1:]
            for e in range(self.gate_proj.shape[0])
            for proj in self.projections
        }

    def checkpoint_tensor(self, name: str) -> Tensor:
        """The tensor stored under official suffix `name` (e.g. "7.up_proj.weight"): a view of its stack."""
        expert, proj, _ = name.split(".")
        return getattr(self, proj)[int(expert)]

    @torch.no_grad()
    def load_tensor(self, name: str, tensor: Tensor) -> None:
        self.checkpoint_tensor(name).copy_(tensor)

    def placed(self, device: torch.device) -> RoutedExperts:
        return twin(self, TritonExperts) if device.type == "cuda" else self

    def forward(self, x: Tensor, idx: Tensor, weights: Tensor) -> Tensor:
        """x [T, D], idx [T, K], weights [T, K] fp32 -> sum_k weights·expert_k(x) [T, D], fp32 accumulation.

        The native bf16 one-token call where it runs, else one token's experts in turn, or grouped by expert.
        """
        if _native_bf16(x, self.gate_proj, self.up_proj, self.down_proj):
            return native.bf16_moe_decode(x[0], idx[0], weights[0], self.gate_proj, self.up_proj, self.down_proj)[None]
        if x.shape[0] == 1:
            return self._single(x, idx, weights)
        return self._grouped(x, idx, weights)

    def _expert(self, e: int | Tensor, x: Tensor) -> Tensor:
        return linear(F.silu(linear(x, self.gate_proj[e])) * linear(x, self.up_proj[e]), self.down_proj[e])

    def _single(self, x: Tensor, idx: Tensor, weights: Tensor) -> Tensor:
        """One token on CPU (batch-1 decode): its K experts one after another, no sorting or
        scatter; each expert's weights are read once, in place (a GEMV is bound by that read)."""
        y = torch.stack([self._expert(e, x) for e in idx[0].tolist()])  # [K, 1, D]
        return torch.einsum("k,kd->d", weights[0], y[:, 0].float())[None]

    def _grouped(self, x: Tensor, idx: Tensor, weights: Tensor) -> Tensor:
        """Sort the T·K (token, expert) pairs by expert and run each active expert once on its tokens
        (`kernels/moe_cpu.py`: one native call for bf16 stacks where the CPU plan says it wins, else a
        `linear` per expert). Touches only the active experts' weights. Needs the per-expert counts on
        the host: free on CPU, a sync on a GPU, which is why GPUs take the fused kernel instead.
        """
        return moe_cpu(x, idx, weights, self.gate_proj, self.up_proj, self.down_proj)


class TritonExperts(RoutedExperts):
    """`RoutedExperts` on CUDA: the fused Triton MoE (sync-free, reads only the chosen experts' weights
    in place, CUDA-graph safe)."""

    def placed(self, device: torch.device) -> RoutedExperts:
        return self if device.type == "cuda" else twin(self, RoutedExperts)

    def forward(self, x: Tensor, idx: Tensor, weights: Tensor) -> Tensor:
        from kimivl_cli.kernels.moe_triton import fused_moe  # Triton only where there is a GPU

        return fused_moe(x, idx, weights, self.gate_proj, self.up_proj, self.down_proj)


class MoE(nn.Module):
    """Routed experts (weighted, fp32 sum) plus always-on shared experts."""

    def __init__(self, cfg: TextConfig) -> None:
        super().__init__()
        self.gate = Router(cfg)
        self.experts = RoutedExperts(cfg.n_routed_experts, cfg.hidden_size, cfg.moe_intermediate_size)
        self.shared_experts = (
            FeedForward(cfg.hidden_size, cfg.moe_intermediate_size * cfg.n_shared_experts)
            if cfg.n_shared_experts
            else None
        )

    def forward(self, x: Tensor) -> Tensor:
        shape = x.shape
        flat = x.reshape(-1, shape[-1])  # [T, D]
        idx, weights = self.gate(flat)
        out = self.experts(flat, idx, weights).to(x.dtype)
        if self.shared_experts is not None:
            out = out + self.shared_experts(flat)
        return out.view(shape)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: TextConfig, layer_idx: int) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = MLAttention(cfg, layer_idx)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MoE(cfg) if cfg.is_moe_layer(layer_idx) else FeedForward(cfg.hidden_size, cfg.intermediate_size)

    def forward(self, x: Tensor, chunk: Chunk) -> Tensor:
        h = x + self.self_attn(self.input_layernorm(x), chunk)
        return h + self.mlp(self.post_attention_layernorm(h))


class DecoderStack(nn.Module):
    """`model.*` in the checkpoint: embeddings, layers, final norm."""

    def __init__(self, cfg: TextConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class LanguageModel(nn.Module, DevicePaths):
    """DeepSeek-V3 causal LM (`language_model.*`): embeddings in, final-norm hidden states out;
    `logits()` is separate so an engine can project only the positions it samples from."""

    def __init__(self, cfg: TextConfig) -> None:
        super().__init__()
        self.config = cfg
        self.model = DecoderStack(cfg)
        # an nn.Linear (loaders expect one): the engine projects one row per step, the native GEMV on CPU
        self.lm_head = Linear(cfg.hidden_size, cfg.vocab_size)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.rotary = RotaryEmbedding(cfg.qk_rope_head_dim, cfg.rope_theta, cfg.rope_scaling)
        # The residual stream's dtype, None for the embeddings': fp32 on CPU (sublayers still compute in
        # the weights' dtype), where a bf16 stream rounds every layer's sum, the largest error of a bf16
        # model against its fp32 self.
        self.residual_dtype: torch.dtype | None = torch.float32

    def placed(self, device: torch.device) -> LanguageModel:
        self.residual_dtype = torch.float32 if device.type == "cpu" else None
        return self

    def embed(self, input_ids: Tensor) -> Tensor:
        return self.model.embed_tokens(input_ids)

    def forward(
        self,
        embeds: Tensor,
        positions: Tensor | int = 0,
        cache: LatentCache | None = None,
        kv_len: int | None = None,
    ) -> Tensor:
        """embeds [B, T, D] -> final-norm hidden states [B, T, D].

        positions: the start position of a contiguous chunk (int), or per-token positions [B, T]
        (e.g. batched decode of requests at different lengths). With a cache, the chunk's rows are
        written at their positions and attention sees slots [0, kv_len); kv_len defaults to
        start + T for an int start, else to the cache capacity (correct by masking; pass a tighter
        bound to save work). Nothing here syncs with the device except the CPU expert grouping.
        """
        B, T, _ = embeds.shape
        if isinstance(positions, int):
            start = positions
            pos = torch.arange(start, start + T, device=embeds.device).expand(B, T)
            kv_len = start + T if kv_len is None else kv_len
        else:
            start, pos = None, positions
            kv_len = (cache.capacity if cache is not None else T) if kv_len is None else kv_len
        chunk = Chunk(self.rotary(pos), pos, start, cache, kv_len)
        h = embeds if self.residual_dtype is None else embeds.to(self.residual_dtype)
        for layer in self.model.layers:
            h = layer(h, chunk)
        return self.model.norm(h)

    def logits(self, hidden: Tensor) -> Tensor:
        """hidden [..., D] -> fp32 logits [..., V] (a plain head: never rounded to the model's dtype,
        which flips ~2% of a random bf16 model's argmaxes)."""
        if isinstance(self.lm_head, Linear):
            return self.lm_head(hidden, torch.float32)
        return self.lm_head(hidden).float()
