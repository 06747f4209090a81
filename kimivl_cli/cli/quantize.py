"""`kimivl quantize SRC DST`: write a pre-quantized checkpoint that loads without requantizing."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated

import typer

from kimivl_cli.errors import InputError

_MODES = ("nf4", "int8")


def register(app: typer.Typer) -> None:
    @app.command("quantize")
    def quantize(
        src: Annotated[
            str, typer.Argument(metavar="SRC", help="Checkpoint folder or Hub repo id (bf16, official format).")
        ],
        dst: Annotated[Path, typer.Argument(metavar="DST", help="Folder to write the quantized checkpoint to.")],
        quant: Annotated[str, typer.Option("--quant", help="nf4 (4-bit) or int8.", case_sensitive=False)] = "nf4",
        force: Annotated[bool, typer.Option("--force", help="Replace the weights already in DST.")] = False,
    ) -> None:
        """Quantize the language model once and save it (safetensors); `--model DST` then loads it directly.

        Vision tower, projector, embeddings, norms, routers and lm_head stay bf16. Needs RAM for the
        quantized model (~10.5 GB for Kimi-VL A3B), never for the bf16 one.
        """
        import torch

        from kimivl_cli.model.weights import save_quantized

        mode = quant.lower()
        if mode not in _MODES:
            raise InputError(f"--quant {quant}: not a quantization", f"use one of {', '.join(_MODES)}")
        started = time.perf_counter()
        written = save_quantized(src, dst, mode, dtype=torch.bfloat16, force=force)
        size = sum(p.stat().st_size for p in written if p.suffix == ".safetensors")
        typer.echo(f"wrote {dst} ({mode}, {size / 1e9:.2f} GB of weights, {time.perf_counter() - started:.1f} s)")
