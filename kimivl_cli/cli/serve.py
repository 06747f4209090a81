"""`kimivl serve`: options in, `serve.ChatServer` over the local engine, until Ctrl-C."""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Annotated, Optional

import typer

from kimivl_cli.cli.common import DEFAULT_MODEL, DeviceOpt, ModelOpt, QuantOpt, QuietOpt, StderrLines
from kimivl_cli.cli.flags import flag, with_flags

LOOPBACK = ("127.0.0.1", "localhost", "::1")


def serve_command(
    model: ModelOpt = DEFAULT_MODEL,
    device: DeviceOpt = "auto",
    quant: QuantOpt = "auto",
    host: Annotated[str, typer.Option("--host", help="Address to bind (loopback unless you mean it).")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", help="TCP port (0: any free port).", min=0, max=65535)] = 8000,
    api_key: Annotated[
        Optional[str],
        typer.Option(
            "--api-key", envvar="KIMIVL_API_KEY", help="Require 'Authorization: Bearer KEY' on every request."
        ),
    ] = None,
    allow_local_files: Annotated[
        bool, typer.Option("--allow-local-files", help="Accept file:// image URLs (reads this machine's files).")
    ] = False,
    queue_size: Annotated[
        int,
        typer.Option(
            "--queue-size",
            help="Requests that may wait while one runs; more get 503 (0: none wait, a busy server answers 503).",
            min=0,
        ),
    ] = 16,
    served_model_name: Annotated[
        Optional[str], typer.Option("--served-model-name", help="Model id in /v1/models (default: --model).")
    ] = None,
    quiet: QuietOpt = False,
) -> None:
    """Serve the model over an OpenAI-compatible API: /v1/models, /v1/chat/completions, /health.

    One request runs at a time on the model; the others wait in a bounded queue.
    """
    from kimivl_cli.backends.local import LocalBackend
    from kimivl_cli.render import Output
    from kimivl_cli.serve import ChatServer
    from kimivl_cli.tasks.backend import open_engine

    with request_log(quiet):
        output = Output(quiet=quiet)
        backend = LocalBackend.lazy(
            lambda: open_engine(
                model,
                device,
                quant,
                progress=lambda total, what: output.progress(total, unit="bytes", description=what),
                note=lambda message: output.note(f"note: {with_flags(message)}"),
            )
        )
        server = ChatServer(  # binds first: a busy port, a bad --host or an empty key fail before the model loads
            backend,
            host,
            port,
            api_key=api_key,
            allow_local_files=allow_local_files,
            queue_size=queue_size,
            model_name=served_model_name or model,
            name_field=flag,
        )
        try:
            _ = backend.engine  # load now, not on the first request
            if api_key:
                auth = "API key required"
            elif host in LOOPBACK:
                auth = "no API key: anyone on this machine can use it"
            else:
                auth = "no API key: anyone who can reach it can use it"
                print(f"warning: serving on {host} without --api-key: {auth.partition(': ')[2]}", file=sys.stderr)
            print(f"serving {server.model_name} at {server.url}, {auth} (Ctrl-C stops)", file=sys.stderr, flush=True)
            server.serve_forever(poll_interval=0.2)
        except KeyboardInterrupt:
            print("stopped", file=sys.stderr)
        finally:
            server.server_close()


@contextmanager
def request_log(quiet: bool) -> Iterator[None]:
    """The request log on stderr (kimivl's loggers only; other libraries' stay silent), for this run
    only: a command also runs in-process (tests), where a handler left behind would log other servers."""
    log = logging.getLogger("kimivl")
    handler, saved = StderrLines(), (log.level, log.propagate)
    log.addHandler(handler)
    log.setLevel(logging.WARNING if quiet else logging.INFO)
    log.propagate = False
    try:
        yield
    finally:
        log.removeHandler(handler)
        log.setLevel(saved[0])
        log.propagate = saved[1]


def register(app: typer.Typer) -> None:
    app.command("serve")(serve_command)
