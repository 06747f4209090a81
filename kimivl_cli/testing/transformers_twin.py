"""Our language model as transformers' `DeepseekV3ForCausalLM`: the config and key mapping, once.

The oracle tests and the CPU benchmark both run transformers' DeepSeek-V3 on our weights.
transformers is a test and benchmark dependency only, so it is imported inside the functions:
importing this module never needs it, and nothing under `kimivl_cli` outside `testing` uses it.

transformers 5 stores each MoE layer's routed experts fused and stacked: `mlp.experts.gate_up_proj`
[E, 2I, D] (gate rows first) and `mlp.experts.down_proj` [E, D, I]; every other key is ours.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from kimivl_cli.model.config import TextConfig

if TYPE_CHECKING:
    from transformers import DeepseekV3Config


def deepseek_v3_config(t: TextConfig) -> DeepseekV3Config:
    """`DeepseekV3Config` describing the same model as `t` (RoPE layout, YaRN scaling included)."""
    from transformers import DeepseekV3Config

    rope: dict[str, object] = {"rope_type": "default", "rope_theta": t.rope_theta}
    if (scaling := t.rope_scaling) is not None:
        rope = {
            "rope_type": "yarn",
            "rope_theta": t.rope_theta,
            "factor": scaling.factor,
            "original_max_position_embeddings": scaling.original_max_position_embeddings,
            "beta_fast": scaling.beta_fast,
            "beta_slow": scaling.beta_slow,
            "mscale": scaling.mscale,
            "mscale_all_dim": scaling.mscale_all_dim,
        }
    return DeepseekV3Config(
        vocab_size=t.vocab_size,
        hidden_size=t.hidden_size,
        intermediate_size=t.intermediate_size,
        moe_intermediate_size=t.moe_intermediate_size,
        num_hidden_layers=t.num_hidden_layers,
        num_attention_heads=t.num_attention_heads,
        num_key_value_heads=t.num_attention_heads,
        n_shared_experts=t.n_shared_experts,
        n_routed_experts=t.n_routed_experts,
        routed_scaling_factor=t.routed_scaling_factor,
        kv_lora_rank=t.kv_lora_rank,
        q_lora_rank=t.q_lora_rank,
        qk_rope_head_dim=t.qk_rope_head_dim,
        qk_nope_head_dim=t.qk_nope_head_dim,
        v_head_dim=t.v_head_dim,
        n_group=t.n_group,
        topk_group=t.topk_group,
        num_experts_per_tok=t.num_experts_per_tok,
        first_k_dense_replace=t.first_k_dense_replace,
        norm_topk_prob=t.norm_topk_prob,
        rms_norm_eps=t.rms_norm_eps,
        max_position_embeddings=t.max_position_embeddings,
        rope_parameters=rope,
        rope_interleave=True,  # our RoPE layout (adjacent pairs, de-interleaved)
        tie_word_embeddings=False,
        attention_bias=False,
        num_mtp_layers=0,
    )


def fuse_experts(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Language-model keys with stacked routed experts (`...mlp.experts.gate_proj` [E, I, D], our
    layout, no `language_model.` prefix) -> transformers' keys: gate and up fused into `gate_up_proj`.
    Other tensors are passed through (shared storage, no copy)."""
    out = {}
    for name, tensor in state.items():
        if ".mlp.experts.gate_proj" in name:
            up = state[name.replace("gate_proj", "up_proj")]
            out[name.replace("gate_proj", "gate_up_proj")] = torch.cat((tensor, up), dim=1)
        elif ".mlp.experts.up_proj" not in name:
            out[name] = tensor
    return out
