"""Opening the local engine from command-line options: one place for device, dtype and 4-bit choices."""

from __future__ import annotations

from typing import TYPE_CHECKING

from kimivl_cli.errors import InputError

if TYPE_CHECKING:
    from kimivl_cli.engine.engine import Engine

QUANT_MODES = ("nf4", "int8", "none")


def resolve_device(device: str) -> str:
    """'auto' -> 'cuda' when a GPU is usable, else 'cpu'; 'cuda' without one is a clear error."""
    import torch

    device = device.lower()
    if device not in ("auto", "cuda", "cpu"):
        raise InputError(f"unknown device {device!r}", "use auto, cuda or cpu")
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise InputError(
            "--device cuda but no CUDA GPU is usable here", "use --device cpu, or install a CUDA build of torch"
        )
    return device


def open_engine(model: str, device: str = "auto", quant: str = "none") -> Engine:
    """Load the checkpoint `model` (folder or Hub id) into an Engine on the chosen device.

    Weights are bf16; `quant` nf4/int8 quantizes the language model's linears while loading.
    """
    import torch

    from kimivl_cli.engine.engine import Engine

    quant = quant.lower()
    if quant not in QUANT_MODES:
        raise InputError(f"unknown --quant {quant!r}", "use nf4, int8 or none")
    kwargs = {"quant": quant} if quant != "none" else {}
    return Engine.load(model, dtype=torch.bfloat16, device=resolve_device(device), **kwargs)
