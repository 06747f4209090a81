"""Options shared by every command, so each flag means the same everywhere."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

DEFAULT_MODEL = "moonshotai/Kimi-VL-A3B-Thinking-2506"

ModelOpt = Annotated[
    str,
    typer.Option("--model", "-m", envvar="KIMIVL_MODEL", help="Checkpoint folder or Hub repo id.", show_default=True),
]
DeviceOpt = Annotated[str, typer.Option("--device", envvar="KIMIVL_DEVICE", help="auto, cuda or cpu.")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON object instead of text.")]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="No progress or notes on stderr.")]
MaxTokensOpt = Annotated[Optional[int], typer.Option("--max-tokens", help="Most new tokens to generate.", min=1)]
TemperatureOpt = Annotated[
    Optional[float], typer.Option("--temperature", "-t", help="Sampling temperature (0 = greedy).", min=0.0)
]
ShowThinkingOpt = Annotated[
    Optional[bool],
    typer.Option("--show-thinking/--hide-thinking", help="Show the reasoning trace of Thinking models."),
]
ThinkingBudgetOpt = Annotated[
    Optional[int], typer.Option("--thinking-budget", help="End the reasoning after N tokens and answer.", min=0)
]
QuantOpt = Annotated[
    str, typer.Option("--quant", help="Language-model weights: nf4 (4-bit), int8 or none (bf16).", case_sensitive=False)
]
PasswordOpt = Annotated[Optional[str], typer.Option("--password", help="Password for encrypted PDFs.")]
TopPOpt = Annotated[Optional[float], typer.Option("--top-p", help="Nucleus sampling threshold.", min=0.0, max=1.0)]
SeedOpt = Annotated[Optional[int], typer.Option("--seed", help="Random seed for reproducible sampling.")]
