"""Weight memory of the language model under NF4, computed from its config (no weights needed)."""

from __future__ import annotations

from kimivl_cli.model.config import TextConfig
from kimivl_cli.weight_formats import BLOCKSIZE

NF4_BYTES_PER_WEIGHT = 0.5 + 4 / BLOCKSIZE  # packed nibble + fp32 absmax per 64 weights
BF16_BYTES = 2


def _layer_linears(cfg: TextConfig, layer: int) -> list[tuple[int, int]]:
    """(out, in) of every quantized linear in one decoder layer."""
    h, heads = cfg.hidden_size, cfg.num_attention_heads
    qk = cfg.qk_nope_head_dim + cfg.qk_rope_head_dim
    attn = [(heads * qk, h)] if cfg.q_lora_rank is None else [(cfg.q_lora_rank, h), (heads * qk, cfg.q_lora_rank)]
    attn += [
        (cfg.kv_lora_rank + cfg.qk_rope_head_dim, h),
        (heads * (cfg.qk_nope_head_dim + cfg.v_head_dim), cfg.kv_lora_rank),
        (h, heads * cfg.v_head_dim),
    ]
    if not cfg.is_moe_layer(layer):
        return attn + [(cfg.intermediate_size, h)] * 2 + [(h, cfg.intermediate_size)]
    inter, shared = cfg.moe_intermediate_size, cfg.moe_intermediate_size * cfg.n_shared_experts
    experts = ([(inter, h)] * 2 + [(h, inter)]) * cfg.n_routed_experts
    return attn + experts + ([(shared, h)] * 2 + [(h, shared)] if shared else [])


def _layer_bf16_params(cfg: TextConfig, layer: int) -> int:
    """Norms and router of one layer (kept in bf16)."""
    norms = 2 * cfg.hidden_size + cfg.kv_lora_rank + (cfg.q_lora_rank or 0)
    return norms + (cfg.n_routed_experts * (cfg.hidden_size + 1) if cfg.is_moe_layer(layer) else 0)


def param_counts(cfg: TextConfig) -> tuple[int, int]:
    """(weights in quantized linears, weights kept in bf16) of the language model."""
    quantized = sum(n * k for layer in range(cfg.num_hidden_layers) for n, k in _layer_linears(cfg, layer))
    plain = sum(_layer_bf16_params(cfg, layer) for layer in range(cfg.num_hidden_layers))
    plain += cfg.vocab_size * cfg.hidden_size * (1 if cfg.tie_word_embeddings else 2) + cfg.hidden_size
    return quantized, plain


def nf4_footprint_bytes(cfg: TextConfig) -> int:
    """Bytes of the language model's weights with every linear in NF4 and the rest in bf16.

    Embeddings, lm_head, norms and routers are bf16. Kimi-VL A3B: 9.95e9 bytes (vs 31.9e9 in bf16).
    """
    quantized, plain = param_counts(cfg)
    return round(quantized * NF4_BYTES_PER_WEIGHT) + plain * BF16_BYTES


def bf16_footprint_bytes(cfg: TextConfig) -> int:
    """The same model entirely in bf16, for comparison."""
    return sum(param_counts(cfg)) * BF16_BYTES
