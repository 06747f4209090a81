"""Options shared by every command, so each flag means the same everywhere.

Options are `Annotated` aliases, reused by every command that takes them. The two groups every
model command takes, where the model runs (`--backend`, `--api-base`, `--api-key`, `--model`,
`--device`, `--quant`) and how it samples (`--max-tokens`, `--temperature`, `--top-p`, `--seed`,
`--thinking-budget`), are listed in each command's signature (last, in that order of flags
after sampling) and built by `open_chat_backend` and `chat_options`.
"""

from __future__ import annotations

import logging
import sys
from typing import TYPE_CHECKING, Annotated, Any, Optional

import typer

from kimivl_cli.cli.flags import with_flags
from kimivl_cli.tasks.backend import DEFAULT_MODEL

if TYPE_CHECKING:
    from kimivl_cli.backends import AnswerOnly, ChatBackend, ChatOptions


class StderrLines(logging.Handler):
    """Log records as `prefix + message` lines on the stderr of the moment, not the one at setup:
    a server thread may outlive the stream it started with (tests and Rich swap it)."""

    def __init__(self, prefix: str = "") -> None:
        super().__init__()
        self.prefix = prefix

    def emit(self, record: logging.LogRecord) -> None:
        print(f"{self.prefix}{with_flags(record.getMessage())}", file=sys.stderr, flush=True)


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
    str,
    typer.Option(
        "--quant",
        help="Language-model weights: nf4 (4-bit, everything), int8 (attention and dense MLPs; the routed experts, "
        "most of the weights, stay bf16), none (bf16), or auto (bf16 if it fits the device, else nf4).",
        case_sensitive=False,
    ),
]
PasswordOpt = Annotated[Optional[str], typer.Option("--password", help="Password for encrypted PDFs.")]
TopPOpt = Annotated[Optional[float], typer.Option("--top-p", help="Nucleus sampling threshold.", min=0.0, max=1.0)]
SeedOpt = Annotated[Optional[int], typer.Option("--seed", help="Random seed for reproducible sampling.")]
BackendOpt = Annotated[
    str,
    typer.Option(
        "--backend",
        envvar="KIMIVL_BACKEND",
        help="local (the model on this machine) or openai (an OpenAI-compatible server: vLLM, SGLang, kimivl serve).",
        case_sensitive=False,
    ),
]
ApiBaseOpt = Annotated[
    Optional[str],
    typer.Option(
        "--api-base", envvar="KIMIVL_API_BASE", help="Server URL for --backend openai, e.g. http://host:8000/v1."
    ),
]
ApiKeyOpt = Annotated[
    Optional[str], typer.Option("--api-key", envvar="KIMIVL_API_KEY", help="API key for --backend openai.")
]
BackendModelOpt = Annotated[
    Optional[str],
    typer.Option(
        "--model",
        "-m",
        envvar="KIMIVL_MODEL",
        help=f"Checkpoint folder or Hub repo id [default: {DEFAULT_MODEL}]; with --backend openai, the served "
        "model name [default: the server's first].",
    ),
]
ForceOpt = Annotated[bool, typer.Option("--force", help="Overwrite an existing OUT.")]
ConcurrencyOpt = Annotated[
    int,
    typer.Option("--concurrency", "-j", help="Requests in flight at once (--backend openai; local runs 1).", min=1),
]


def open_chat_backend(
    backend: str,
    api_base: str | None,
    api_key: str | None,
    model: str | None,
    device: str,
    quant: str,
    quiet: bool,
) -> ChatBackend:
    """The backend the `--backend` group of flags names, with a bar on a terminal while the model
    loads and notes for what it ignores."""
    from kimivl_cli.render import Output
    from kimivl_cli.tasks import backend as backends

    output = Output(quiet=quiet)

    def progress(total: int, description: str) -> Any:
        return output.progress(total, unit="bytes", description=description)

    # looked up at call time: tests put a fake model here
    return backends.open_backend(
        backend=backend,
        model=model,
        device=device,
        quant=quant,
        api_base=api_base,
        api_key=api_key,
        progress=progress,
        note=lambda message: output.note(f"note: {with_flags(message)}"),
    )


def chat_options(
    max_tokens: int | None,
    temperature: float | None,
    top_p: float | None,
    seed: int | None,
    thinking_budget: int | None,
) -> ChatOptions:
    """The sampling flags as request options (None: the backend's default)."""
    from kimivl_cli.backends import ChatOptions

    return ChatOptions(
        max_tokens=max_tokens, temperature=temperature, top_p=top_p, seed=seed, thinking_budget=thinking_budget
    )


def batch_answerer(
    backend: ChatBackend, sampling: ChatOptions, concurrency: int, quiet: bool
) -> tuple[AnswerOnly, int]:
    """The answer-only view of `backend` for a batch command and the concurrency it allows: the
    asked one, or 1 for the local engine (said on stderr unless `quiet`)."""
    from kimivl_cli.backends import AnswerOnly
    from kimivl_cli.tasks.backend import batch_concurrency

    concurrency, note = batch_concurrency(backend, concurrency)
    notes = [note] if note else []
    for message in [*notes, *backend.option_notes(sampling)]:
        if not quiet:
            print(f"note: {with_flags(message)}", file=sys.stderr)
    return AnswerOnly(backend, sampling, limit=concurrency), concurrency
