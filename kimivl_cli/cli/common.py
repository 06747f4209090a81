"""Options shared by every command, so each flag means the same everywhere.

Single options are `Annotated` aliases. The two groups every model command takes, where the
model runs (`--backend`, `--api-base`, `--api-key`, `--model`, `--device`, `--quant`) and how it
samples (`--max-tokens`, `--temperature`, `--top-p`, `--seed`, `--thinking-budget`), are added by
the decorators `backend_options` and `sampling_options`: the command declares one parameter,
`backend: ChatBackend` or `sampling: ChatOptions`, and receives it built from the flags.
"""

from __future__ import annotations

import functools
import inspect
import logging
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Annotated, Any, Optional, TypeVar

import typer

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
        print(f"{self.prefix}{record.getMessage()}", file=sys.stderr, flush=True)


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

F = TypeVar("F", bound=Callable[..., Any])


def fold_options(
    target: str, flags: dict[str, tuple[Any, Any]], build: Callable[..., Any], shared: tuple[str, ...] = ()
) -> Callable[[F], F]:
    """Replace the command's parameter `target` by the options `flags` (name -> (annotation, default));
    Typer sees the options, the command gets `build(**their values)` as `target`. `shared`: the
    command's own parameters that `build` also receives (e.g. `quiet`)."""

    def decorate(command: F) -> F:
        signature = inspect.signature(command)
        if target not in signature.parameters:
            raise TypeError(f"{command.__name__} has no parameter {target!r} to fill")
        if missing := [name for name in shared if name not in signature.parameters]:
            raise TypeError(f"{command.__name__} lacks {missing}, which {target!r} is built from")
        # Typer needs the options' `Annotated` objects, not the strings `from __future__ import
        # annotations` leaves.
        namespace = command.__globals__
        kept = [
            p.replace(annotation=_evaluated(p.annotation, namespace))
            for p in signature.parameters.values()
            if p.name != target
        ]
        added = [
            inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=annotation)
            for name, (annotation, default) in flags.items()
        ]

        @functools.wraps(command)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            values = {name: kwargs.pop(name) for name in flags}
            kwargs[target] = build(**values, **{name: kwargs[name] for name in shared})
            return command(*args, **kwargs)

        wrapper.__signature__ = signature.replace(parameters=[*kept, *added])  # type: ignore[attr-defined]
        wrapper.__annotations__ = {p.name: p.annotation for p in [*kept, *added]}
        return wrapper  # type: ignore[return-value]

    return decorate


def _evaluated(annotation: Any, namespace: dict[str, Any]) -> Any:
    """A string annotation of one of our commands as the object; an import for type checkers only
    stays a string (it is another decorator's target, gone before Typer reads the signature)."""
    if not isinstance(annotation, str):
        return annotation
    try:
        return eval(annotation, namespace)
    except NameError:
        return annotation


def _open_backend(quiet: bool, **flags: Any) -> Any:
    """The backend, with a bar on a terminal while the model loads and notes for what it ignores."""
    from kimivl_cli.render import Output
    from kimivl_cli.tasks import backend

    output = Output(quiet=quiet)

    def progress(total: int, description: str) -> Any:
        return output.progress(total, unit="bytes", description=description)

    # looked up at call time: tests put a fake model here
    return backend.open_backend(**flags, progress=progress, note=lambda message: output.note(f"note: {message}"))


def _chat_options(**flags: Any) -> Any:
    from kimivl_cli.backends import ChatOptions

    return ChatOptions(**flags)


backend_options = fold_options(
    "backend",
    {
        "backend": (BackendOpt, "local"),
        "api_base": (ApiBaseOpt, None),
        "api_key": (ApiKeyOpt, None),
        "model": (BackendModelOpt, None),
        "device": (DeviceOpt, "auto"),
        "quant": (QuantOpt, "auto"),
    },
    _open_backend,
    shared=("quiet",),
)
"""Adds --backend/--api-base/--api-key/--model/--device/--quant; the command (which takes `quiet`)
gets `backend: ChatBackend`."""

sampling_options = fold_options(
    "sampling",
    {
        "max_tokens": (MaxTokensOpt, None),
        "temperature": (TemperatureOpt, None),
        "top_p": (TopPOpt, None),
        "seed": (SeedOpt, None),
        "thinking_budget": (ThinkingBudgetOpt, None),
    },
    _chat_options,
)
"""Adds --max-tokens/--temperature/--top-p/--seed/--thinking-budget; the command gets `sampling: ChatOptions`."""


def batch_answerer(
    backend: ChatBackend, sampling: ChatOptions, concurrency: int, quiet: bool
) -> tuple[AnswerOnly, int]:
    """The answer-only view of `backend` for a batch command and the concurrency it allows: the
    asked one, or 1 for the local engine (said on stderr unless `quiet`)."""
    from kimivl_cli.backends import AnswerOnly
    from kimivl_cli.tasks.backend import batch_concurrency, sampling_notes

    concurrency, note = batch_concurrency(backend, concurrency)
    notes = [note] if note else []
    for message in [*notes, *sampling_notes(backend, sampling)]:
        if not quiet:
            print(f"note: {message}", file=sys.stderr)
    return AnswerOnly(backend, sampling, limit=concurrency), concurrency
