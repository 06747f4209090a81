"""`kimivl video-scenes`."""

from __future__ import annotations

import typer

from kimivl_cli.errors import RuntimeFailure


def register(app: typer.Typer) -> None:
    @app.command("video-scenes", context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
    def _command(ctx: typer.Context) -> None:
        """Not available yet."""
        raise RuntimeFailure("'kimivl video-scenes' is not available in this build yet")
