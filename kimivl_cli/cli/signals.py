"""SIGTERM ends a command the way Ctrl-C does (exit 143 instead of 130): `kill`, `timeout`,
`docker stop` and systemd send it.

The handler re-sends the signal to the main thread as SIGINT, so every rule for Ctrl-C holds for
SIGTERM too: code that holds SIGINT back while it writes a page (`pthread_sigmask`) holds this one
back as well, and whatever catches KeyboardInterrupt to leave outputs whole does so; the exception
raised is `errors.Terminated`, a KeyboardInterrupt, so a loop that survives Ctrl-C can tell it apart.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from kimivl_cli.errors import Terminated

_terminating = threading.Event()


def terminating() -> bool:
    """Whether a SIGTERM arrived during this command."""
    return _terminating.is_set()


@contextmanager
def sigterm_as_sigint() -> Iterator[None]:
    """Handle SIGTERM like SIGINT in the block (main thread only); the old handlers come back after."""
    if threading.current_thread() is not threading.main_thread() or not hasattr(signal, "pthread_kill"):
        yield
        return
    _terminating.clear()
    old_int, old_term = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    sigint_ignored = old_int in (signal.SIG_IGN, None)  # e.g. a background job of a script

    def on_sigint(signum: int, frame: Any) -> None:
        if _terminating.is_set():
            raise Terminated
        if sigint_ignored:
            return
        raise KeyboardInterrupt

    def on_sigterm(signum: int, frame: Any) -> None:
        _terminating.set()
        signal.pthread_kill(threading.main_thread().ident, signal.SIGINT)  # pending while SIGINT is held back

    signal.signal(signal.SIGINT, on_sigint)
    signal.signal(signal.SIGTERM, on_sigterm)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, old_int)
        signal.signal(signal.SIGTERM, old_term)
