"""Weight quantization: the modules that hold quantized weights (`modules`, in the formats of
`kimivl_cli.weight_formats`) and the one list of modes every command accepts. Between `kernels`
(which its modules call) and `model` (whose loader swaps them in)."""

from __future__ import annotations

from collections.abc import Sequence

from kimivl_cli.errors import InputError

QUANT_MODES = ("auto", "none", "nf4", "int8")
"""`--quant`: "auto" quantizes only when bf16 would not fit the device, "none" keeps bf16; a
checkpoint is stored as "none", "nf4" or "int8"."""

STORED_MODES = QUANT_MODES[1:]
SAVED_MODES = ("nf4", "int8")
"""What `kimivl quantize` writes."""


def quant_mode(value: str, allowed: Sequence[str] = QUANT_MODES) -> str:
    """`value` lower-cased when it is one of `allowed`, else an InputError naming them."""
    mode = value.lower()
    if mode not in allowed:
        raise InputError(f"unknown quantization {value!r}", f"use one of {', '.join(allowed)}")
    return mode
