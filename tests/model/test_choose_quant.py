"""`--quant auto`: bf16 when the model fits the device's memory with room to spare, else nf4."""

from __future__ import annotations

import math

import pytest
import torch

from kimivl_cli.model import weights
from kimivl_cli.model.weights import choose_quant, device_memory_bytes, load_model
from kimivl_cli.testing.checkpoint import SIZES, count_params

GIB = 2**30


@pytest.mark.parametrize(
    ("memory_gib", "expected"),
    [(23.5, "nf4"), (40, "nf4"), (80, "none"), (141, "none")],
)
def test_real_size_model(monkeypatch, memory_gib: float, expected: str) -> None:
    monkeypatch.setattr(weights, "device_memory_bytes", lambda device: int(memory_gib * GIB))
    mode, why = choose_quant(SIZES["full"], torch.bfloat16, "cpu")
    assert mode == expected
    assert f"{memory_gib:.1f} GiB" in why


def test_weight_bytes_are_the_parameter_count(monkeypatch) -> None:
    cfg = SIZES["small"]
    weight_bytes = count_params(cfg) * 2
    just_enough = math.ceil(weight_bytes / weights.AUTO_WEIGHT_SHARE)
    monkeypatch.setattr(weights, "device_memory_bytes", lambda device: just_enough)
    assert choose_quant(cfg, torch.bfloat16, "cpu")[0] == "none"
    monkeypatch.setattr(weights, "device_memory_bytes", lambda device: just_enough - 2)
    assert choose_quant(cfg, torch.bfloat16, "cpu")[0] == "nf4"


def test_host_memory_is_read() -> None:
    assert 64 * 2**20 < device_memory_bytes("cpu") < 2**50


def test_load_model_auto_on_a_roomy_machine_keeps_the_weights(tiny_checkpoint) -> None:
    model, _ = load_model(tiny_checkpoint, dtype=torch.float32, quant="auto")
    assert not any(getattr(m, "quantized", False) for m in model.modules())
