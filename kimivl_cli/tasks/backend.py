"""Opening a backend from command-line options: the local engine (device, dtype, 4-bit) or a server."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from kimivl_cli.errors import InputError
from kimivl_cli.quant import quant_mode

if TYPE_CHECKING:
    from kimivl_cli.backends import ChatBackend
    from kimivl_cli.engine.engine import Engine
    from kimivl_cli.model.weights import LoadProgress

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
            "`device` cuda but no CUDA GPU is usable here", "use `device` cpu, or install a CUDA build of torch"
        )
    return device


INT8_EXPERTS_NOTE = (
    "`quant` int8 quantizes attention and the dense and shared MLPs; the routed experts (most of the "
    "weights) stay bf16, so it saves little memory: use `quant` nf4 to fit a smaller device"
)


def open_engine(
    model: str,
    device: str = "auto",
    quant: str = "auto",
    progress: LoadProgress | None = None,
    note: Callable[[str], None] = lambda message: None,
) -> Engine:
    """Load the checkpoint `model` (folder or Hub id) into an Engine on the chosen device.

    Weights are bf16; `quant` nf4/int8 quantizes the language model's linears while loading, auto
    does so only when bf16 would not fit the device (`model.weights.choose_quant`). A checkpoint
    saved quantized loads as saved. `progress` shows the loading; what differs from what was
    asked is told to `note` and kept in the engine's `notes`.
    """
    import torch

    from kimivl_cli.engine.engine import Engine
    from kimivl_cli.model.weights import SafetensorsFile, checkpoint_files, resolve_checkpoint, stored_quant

    quant = quant_mode(quant)
    folder = resolve_checkpoint(model)
    stored = stored_quant([SafetensorsFile(path) for path in checkpoint_files(folder)])
    notes = []
    if quant == "none" and stored != "none":
        notes.append(f"`quant` none ignored: {model} was saved quantized as {stored}, so it loads as {stored}")
    if "int8" in (quant, stored):
        notes.append(INT8_EXPERTS_NOTE)
    engine = Engine.load(model, dtype=torch.bfloat16, device=resolve_device(device), quant=quant, progress=progress)
    for message in notes:
        note(message)
    engine.notes += notes
    return engine


def open_backend(
    backend: str = "local",
    model: str | None = None,
    device: str = "auto",
    quant: str = "auto",
    api_base: str | None = None,
    api_key: str | None = None,
    progress: LoadProgress | None = None,
    note: Callable[[str], None] = lambda message: None,
) -> ChatBackend:
    """The backend the options name; nothing is loaded or contacted yet.

    local: `model` is a checkpoint (default `DEFAULT_MODEL`), loaded on first use (shown by
    `progress`). openai: `model` is the served model's name (default: the server's first
    `/v1/models` entry); device and quant belong to the server and are ignored. Options not
    honoured are told to `note` and kept in the backend's `notes`.
    """
    backend = backend.lower()
    if backend == "local":
        from kimivl_cli.backends.local import LocalBackend

        quant_mode(quant)  # checked now: a typo should not wait for the first page
        return LocalBackend.lazy(lambda: open_engine(model or DEFAULT_MODEL, device, quant, progress, note))
    if backend == "openai":
        from kimivl_cli.backends.openai import OpenAIBackend

        if not api_base:
            raise InputError(
                "`backend` openai needs the server's address",
                "add `api_base` http://HOST:8000/v1, or set KIMIVL_API_BASE",
            )
        server = OpenAIBackend(api_base, api_key, model)
        ignored = [
            f"`{name}` {value}" for name, value in (("device", device), ("quant", quant)) if value.lower() != "auto"
        ]
        if ignored:
            server.notes.append(f"{', '.join(ignored)} ignored: the server chooses its own device and weights")
        for message in server.notes:
            note(message)
        return server
    raise InputError(f"unknown `backend` {backend!r}", f"use {' or '.join(BACKENDS)}")


def batch_concurrency(backend: ChatBackend, concurrency: int) -> tuple[int, str | None]:
    """Requests a batch command may keep in flight on `backend`, and a note when that is not what was asked.

    A backend that runs fewer at once (the local engine: one) would only queue more threads.
    """
    limit = backend.max_concurrency
    if limit is not None and concurrency > limit:
        return (
            limit,
            f"`concurrency` {concurrency} ignored: the local engine runs one request at a time (running {limit})",
        )
    return concurrency, None
