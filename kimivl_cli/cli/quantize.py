"""`kimivl quantize SRC DST`: write a pre-quantized checkpoint that loads without requantizing."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated

import typer

from kimivl_cli.cli.common import QuietOpt
from kimivl_cli.quant import SAVED_MODES, quant_mode


def quantize_command(
    src: Annotated[
        str, typer.Argument(metavar="SRC", help="Checkpoint folder or Hub repo id (bf16, official format).")
    ],
    dst: Annotated[Path, typer.Argument(metavar="DST", help="Folder to write the quantized checkpoint to.")],
    quant: Annotated[
        str,
        typer.Option(
            "--quant",
            help="nf4 (4-bit, every linear) or int8 (attention and dense MLPs; routed experts stay bf16).",
            case_sensitive=False,
        ),
    ] = "nf4",
    force: Annotated[bool, typer.Option("--force", help="Replace the weights already in DST.")] = False,
    quiet: QuietOpt = False,
) -> None:
    """Quantize the language model once and save it (safetensors); `--model DST` then loads it directly.

    Vision tower, projector, embeddings, norms, routers and lm_head stay bf16 (with int8, the
    routed experts too). Needs RAM for the quantized model (~10.5 GB for Kimi-VL A3B in nf4),
    never for the bf16 one.
    """
    import torch

    from kimivl_cli.cli.flags import with_flags
    from kimivl_cli.model.weights import save_quantized
    from kimivl_cli.render import Output
    from kimivl_cli.tasks.backend import INT8_EXPERTS_NOTE

    mode = quant_mode(quant, SAVED_MODES)
    output = Output(quiet=quiet)
    if mode == "int8":
        output.note(f"note: {with_flags(INT8_EXPERTS_NOTE)}")
    started = time.perf_counter()
    written = save_quantized(
        src,
        dst,
        mode,
        dtype=torch.bfloat16,
        force=force,
        progress=lambda total, what: output.progress(total, unit="bytes", description=what),
    )
    size = sum(p.stat().st_size for p in written if p.suffix == ".safetensors")
    typer.echo(f"wrote {dst} ({mode}, {size / 1e9:.2f} GB of weights, {time.perf_counter() - started:.1f} s)")


def register(app: typer.Typer) -> None:
    app.command("quantize")(quantize_command)
