"""NF4 footprint of the full language model, from the config alone."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn

from kimivl_cli.model.config import TextConfig
from kimivl_cli.quant.modules import NF4Experts, NF4Linear
from kimivl_cli.testing.footprint import bf16_footprint_bytes, nf4_footprint_bytes, param_counts


def test_full_size_language_model_fits_in_10_gb() -> None:
    cfg = TextConfig()
    assert sum(param_counts(cfg)) == 15_960_110_208  # spec §2: LM 15.960B parameters
    assert nf4_footprint_bytes(cfg) <= 10e9
    assert bf16_footprint_bytes(cfg) / nf4_footprint_bytes(cfg) == pytest.approx(3.2, abs=0.05)


def test_footprint_equals_the_bytes_of_real_modules() -> None:
    """Build one dense and one MoE layer of a small config as modules and count their buffers."""
    cfg = dataclasses.replace(
        TextConfig(), vocab_size=256, hidden_size=128, intermediate_size=192, moe_intermediate_size=64,
        num_hidden_layers=2, num_attention_heads=2, kv_lora_rank=64, qk_nope_head_dim=32, qk_rope_head_dim=64,
        v_head_dim=32, n_routed_experts=4, n_shared_experts=2,
    )  # fmt: skip
    h, heads = cfg.hidden_size, cfg.num_attention_heads
    modules: list[nn.Module] = []
    for _ in range(2):  # attention of both layers
        modules += [
            NF4Linear(h, heads * 96),
            NF4Linear(h, cfg.kv_lora_rank + 64),
            NF4Linear(cfg.kv_lora_rank, heads * 64),
            NF4Linear(heads * 32, h),
        ]
    modules += [NF4Linear(h, 192), NF4Linear(h, 192), NF4Linear(192, h)]  # dense MLP
    modules += [NF4Experts(4, h, 64), NF4Linear(h, 128), NF4Linear(h, 128), NF4Linear(128, h)]
    quantized_bytes = sum(b.nbytes for m in modules for b in m.buffers())
    plain = 2 * (2 * h + cfg.kv_lora_rank) + 4 * (h + 1) + 2 * cfg.vocab_size * h + h
    assert nf4_footprint_bytes(cfg) == quantized_bytes + plain * torch.bfloat16.itemsize
