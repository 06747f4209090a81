"""Paths are chosen once, when the model is built: no code in model/ or quant/ reads the device per call.

The device is read only where the loader places a module (`placed`), when a module is built
(`__init__`), and by the loader itself (`model/weights.py`: how much memory the device has).
"""

from __future__ import annotations

import ast
from pathlib import Path

import torch

from kimivl_cli.model.config import TextConfig
from kimivl_cli.model.hooks import place
from kimivl_cli.model.language import LanguageModel, RoutedExperts, TritonExperts
from kimivl_cli.quant.modules import NF4Experts, NF4Linear, TritonNF4Experts, TritonNF4Linear, quantize_linears_

PACKAGE = Path(__file__).resolve().parents[2] / "kimivl_cli"
BUILD_TIME = {"placed", "__init__"}


def _device_reads(tree: ast.AST) -> list[tuple[str, int]]:
    """(function, line) of each device read: `.is_cuda`, `.device.type`, `is_compiling`, `hasattr(...)`."""
    found = []
    for func in ast.walk(tree):
        if not isinstance(func, ast.FunctionDef) or func.name in BUILD_TIME:
            continue
        for node in ast.walk(func):
            attr = node.attr if isinstance(node, ast.Attribute) else None
            is_device_type = (
                attr == "type" and isinstance(node.value, ast.Attribute) and node.value.attr == "device"  # type: ignore[union-attr]
            )
            probe = isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "hasattr"
            if attr in ("is_cuda", "is_compiling") or is_device_type or probe:
                found.append((func.name, node.lineno))
    return found


def test_no_model_or_quant_code_reads_the_device_per_call() -> None:
    reads = {
        f"{path.relative_to(PACKAGE)}:{line} {name}"
        for folder in ("model", "quant")
        for path in sorted((PACKAGE / folder).glob("*.py"))
        if path.name != "weights.py"
        for name, line in _device_reads(ast.parse(path.read_text(encoding="utf-8")))
    }
    assert reads == set()


def test_the_scan_sees_a_device_branch() -> None:
    code = "def forward(self, x):\n    if x.device.type == 'cpu' or x.is_cuda:\n        return x\n"
    assert _device_reads(ast.parse(code)) == [("forward", 2), ("forward", 2)]


def test_placing_on_cuda_swaps_in_the_triton_modules_and_back() -> None:
    cfg = TextConfig(
        vocab_size=256, hidden_size=128, intermediate_size=192, moe_intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=2, kv_lora_rank=64, qk_nope_head_dim=32, qk_rope_head_dim=64, v_head_dim=32,
        n_routed_experts=4, n_shared_experts=1, first_k_dense_replace=1,
    )  # fmt: skip
    with torch.device("meta"):
        bf16, nf4 = LanguageModel(cfg), quantize_linears_(LanguageModel(cfg), "nf4", device="meta")
    experts = bf16.model.layers[1].mlp.experts
    for lm, kinds in (
        (bf16, {RoutedExperts: TritonExperts}),
        (nf4, {NF4Experts: TritonNF4Experts, NF4Linear: TritonNF4Linear}),
    ):
        cpu_types = {type(m) for m in lm.modules()}
        place(lm, "cuda")
        cuda_types = {type(m) for m in lm.modules()}
        assert all(cpu in cpu_types and cpu not in cuda_types and cuda in cuda_types for cpu, cuda in kinds.items())
        assert lm.residual_dtype is None and not lm.model.layers[0].self_attn.absorbed_dtype
        place(lm, "cpu")
        assert {type(m) for m in lm.modules()} == cpu_types and lm.residual_dtype == torch.float32
    assert bf16.model.layers[1].mlp.experts.gate_proj is experts.gate_proj  # the twin holds the same tensors
