"""User-facing errors.

Every failure a user can cause or fix is raised as a `KimivlError`: the CLI prints
`error: <message>` (plus the hint) on one line of stderr and exits with `exit_code`,
never a traceback (unless `--debug`). Code below the CLI raises these and nothing prints.
Messages name options by their field, in backquotes (`max_context`); the CLI shows each as
its flag (`--max-context`), other callers (the server, the library) as the field.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable

FIELD = re.compile(r"`([a-z][a-z0-9_]*)`")
"""An option named in a message: `max_context`."""


def name_fields(text: str, name: Callable[[str], str]) -> str:
    """`text` with each backquoted field shown as `name(field)` (e.g. the CLI's flag)."""
    return FIELD.sub(lambda match: name(match[1]), text)


notes = logging.getLogger("kimivl.notes")
"""Notes for the user from below the CLI (a file skipped, a cap applied): the CLI prints each
record as one `note:` line on stderr; nothing else in the package prints."""


class KimivlError(Exception):
    """An error with a message for the user, a hint on how to fix it, and an exit code."""

    exit_code = 1

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def one_line(self, name: Callable[[str], str] = lambda field: f"`{field}`") -> str:
        """Message and hint on one line, fields shown by `name` (default: as they are written)."""
        text = self.message.rstrip(".")
        if self.hint:
            text += f" ({self.hint.rstrip('.')})"
        return name_fields(" ".join(text.split()), name)


class InputError(KimivlError):
    """Bad input or usage: unreadable, corrupt or unsupported files, bad options (exit 2)."""

    exit_code = 2


class CheckpointError(InputError):
    """A model folder that is missing, incomplete, mismatched or unsafe (exit 2)."""


class RuntimeFailure(KimivlError):
    """Something went wrong while running: out of memory, a kernel failed (exit 1)."""

    exit_code = 1


class Terminated(KeyboardInterrupt):
    """SIGTERM, delivered like Ctrl-C (see `cli.signals`): whoever catches KeyboardInterrupt to
    finish cleanly does so for both; a loop that survives Ctrl-C (chat) re-raises this one."""
