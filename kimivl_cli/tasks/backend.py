"""Opening a backend from command-line options: the local engine (device, dtype, 4-bit) or a server."""

from __future__ import annotations

from typing import TYPE_CHECKING

from kimivl_cli.errors import InputError

if TYPE_CHECKING:
    from kimivl_cli.backends import ChatBackend
    from kimivl_cli.engine.engine import Engine

QUANT_MODES = ("auto", "nf4", "int8", "none")
BACKENDS = ("local", "openai")
DEFAULT_MODEL = "moonshotai/Kimi-VL-A3B-Thinking-2506"


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


def open_engine(model: str, device: str = "auto", quant: str = "auto") -> Engine:
    """Load the checkpoint `model` (folder or Hub id) into an Engine on the chosen device.

    Weights are bf16; `quant` nf4/int8 quantizes the language model's linears while loading, auto
    does so only when bf16 would not fit the device (`model.weights.choose_quant`).
    """
    import torch

    from kimivl_cli.engine.engine import Engine

    quant = quant.lower()
    if quant not in QUANT_MODES:
        raise InputError(f"unknown --quant {quant!r}", "use auto, nf4, int8 or none")
    return Engine.load(model, dtype=torch.bfloat16, device=resolve_device(device), quant=quant)


def open_backend(
    backend: str = "local",
    model: str | None = None,
    device: str = "auto",
    quant: str = "auto",
    api_base: str | None = None,
    api_key: str | None = None,
) -> ChatBackend:
    """The backend the options name; nothing is loaded or contacted yet.

    local: `model` is a checkpoint (default `DEFAULT_MODEL`), loaded on first use. openai: `model`
    is the served model's name (default: the server's first `/v1/models` entry); device and
    quant belong to the server and are ignored.
    """
    backend = backend.lower()
    if backend == "local":
        from kimivl_cli.backends.local import LocalBackend

        if quant.lower() not in QUANT_MODES:  # checked now: a typo should not wait for the first page
            raise InputError(f"unknown --quant {quant!r}", "use auto, nf4, int8 or none")
        return LocalBackend.lazy(lambda: open_engine(model or DEFAULT_MODEL, device, quant))
    if backend == "openai":
        from kimivl_cli.backends.openai import OpenAIBackend

        if not api_base:
            raise InputError(
                "--backend openai needs the server's address",
                "add --api-base http://HOST:8000/v1, or set KIMIVL_API_BASE",
            )
        return OpenAIBackend(api_base, api_key, model)
    raise InputError(f"unknown --backend {backend!r}", f"use {' or '.join(BACKENDS)}")


def batch_concurrency(backend: ChatBackend, concurrency: int) -> tuple[int, str | None]:
    """Requests a batch command may keep in flight on `backend`, and a note when that is not what was asked.

    The local engine runs one request at a time, so more threads would only queue on it.
    """
    from kimivl_cli.backends.local import LocalBackend

    if concurrency > 1 and isinstance(backend, LocalBackend):
        return 1, f"--concurrency {concurrency} ignored: the local engine runs one request at a time (running 1)"
    return concurrency, None
