"""`kimivl chat`."""

from __future__ import annotations

import typer

from kimivl_cli.errors import RuntimeFailure


def register(app: typer.Typer) -> None:
    @app.command("chat", context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
    def _command(ctx: typer.Context) -> None:
        """Not available yet."""
        raise RuntimeFailure("'kimivl chat' is not available in this build yet")
