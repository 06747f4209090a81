"""Option fields as the flags that set them: lower layers name `max_context`, users read `--max-context`.

The table is read off the commands themselves, so it names only flags that exist.
"""

from __future__ import annotations

import functools

import typer

from kimivl_cli.errors import KimivlError, name_fields


@functools.cache
def flag_table() -> dict[str, str]:
    """Each option's field (its parameter name) -> its long flag, over every command."""
    from kimivl_cli.cli import app

    table: dict[str, str] = {}
    group = typer.main.get_command(app)
    for command in group.commands.values():  # type: ignore[attr-defined]
        for param in command.params:
            if param.param_type_name == "option" and param.name:
                table.setdefault(param.name, next((o for o in param.opts if o.startswith("--")), param.opts[0]))
    return table


def flag(field: str) -> str:
    """`field`'s flag; a field no command has stays as written, in backquotes."""
    return flag_table().get(field, f"`{field}`")


def error_line(exc: KimivlError) -> str:
    """The one line an error gets on stderr."""
    return f"error: {exc.one_line(flag)}"


def with_flags(text: str) -> str:
    """A note from below the CLI, its fields shown as flags."""
    return name_fields(text, flag)
