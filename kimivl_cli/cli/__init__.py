"""The `kimivl` command line, the last layer of the one-way flow: a thin Typer layer over `tasks/`.

Each command lives in its own module and only parses options, calls a task and
hands the result to `render`. Every `KimivlError` becomes one `error:` line on
stderr and its exit code; other exceptions too (exit 1) unless `--debug`.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import warnings

import typer

from kimivl_cli import __version__
from kimivl_cli.cli import ask, chat, info, inspect, ocr, quantize, serve, video_scenes
from kimivl_cli.cli.common import StderrLines
from kimivl_cli.cli.flags import error_line
from kimivl_cli.cli.signals import sigterm_as_sigint, terminating
from kimivl_cli.errors import KimivlError, notes

app = typer.Typer(
    name="kimivl",
    help=(
        "Ask Kimi-VL about images, PDFs and videos; OCR documents to Markdown; split videos into scenes.\n\n"
        "Examples:\n\n"
        '  kimivl ask photo.jpg report.pdf "What changed between these?"\n\n'
        "  kimivl ocr scan.pdf -o scan.md\n\n"
        "  kimivl video-scenes talk.mp4 --format json\n\n"
        '  cat page.png | kimivl ask - "Transcribe" --json | jq .answer'
    ),
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"kimivl {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(
        False, "--version", callback=_version, is_eager=True, help="Print the version and exit."
    ),
    debug: bool = typer.Option(False, "--debug", envvar="KIMIVL_DEBUG", help="Show tracebacks for errors."),
) -> None:
    if debug:
        os.environ["KIMIVL_DEBUG"] = "1"


for module in (ask, chat, ocr, video_scenes, inspect, info, quantize, serve):
    module.register(app)


def route_logs(debug: bool = False) -> None:
    """Only kimivl speaks on stderr: `errors.notes` as `note: ...` lines; libraries' log records
    (bitsandbytes warns on import on some CPUs) and Python warnings are dropped unless debugging.

    A handler on the root logger keeps Python from printing records nobody handles; kimivl's own
    loggers (`kimivl.*`, e.g. serve's request log) have their own handlers.
    """
    if not any(isinstance(h, StderrLines) for h in notes.handlers):
        notes.addHandler(StderrLines("note: "))
        notes.propagate = False
    if debug:
        return
    root = logging.getLogger()
    if not root.handlers:
        root.addHandler(logging.NullHandler())
    warnings.simplefilter("ignore")


def _exit_now(code: int) -> None:
    """Exit after an interrupt. Requests still running in pool threads (`--concurrency`) are
    abandoned rather than waited for: outputs are already whole (written atomically or page by page)."""
    sys.stdout.flush()
    sys.stderr.flush()
    if any(t.is_alive() and not t.daemon for t in threading.enumerate() if t is not threading.main_thread()):
        os._exit(code)
    sys.exit(code)


def main() -> None:
    """Entry point: run the app, turning every error into one line and an exit code."""
    debug = "--debug" in sys.argv[1:] or os.environ.get("KIMIVL_DEBUG") == "1"
    route_logs(debug)
    with sigterm_as_sigint():
        _run(debug)


def _exit_with(code: object) -> None:
    """The exit for what a command returned: nothing or 0 goes on; Typer returns 130 (Ctrl-C
    caught inside click) instead of raising."""
    if not isinstance(code, int) or not code:
        return
    if code == 130:
        if terminating():
            print("terminated", file=sys.stderr)
        _exit_now(143 if terminating() else 130)
    sys.exit(code)


def _usage_error(exc: typer.TyperException) -> None:
    ctx = getattr(exc, "ctx", None)
    hint = f" (see: {ctx.command_path} --help)" if ctx is not None and exc.exit_code == 2 else ""
    print(f"error: {exc.format_message()}{hint}", file=sys.stderr)
    sys.exit(exc.exit_code)


def _run(debug: bool) -> None:
    try:
        _exit_with(app(standalone_mode=False, prog_name="kimivl"))
    except KimivlError as exc:
        if debug:
            raise
        print(error_line(exc), file=sys.stderr)
        sys.exit(exc.exit_code)
    except typer.Exit as exc:
        if exc.exit_code == 130:  # a command that caught Ctrl-C or SIGTERM itself
            _exit_now(143 if terminating() else 130)
        sys.exit(exc.exit_code)
    except (typer.Abort, KeyboardInterrupt) as exc:
        if terminating():  # SIGTERM: the shell's 128 + 15
            print("terminated", file=sys.stderr)
            _exit_now(143)
        print("aborted" if isinstance(exc, typer.Abort) else "interrupted", file=sys.stderr)
        _exit_now(130)
    except BrokenPipeError:
        # The reader went away (`| head`): quiet exit, as other Unix tools do.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(0)
    except typer.TyperException as exc:  # click's usage errors, vendored by Typer
        _usage_error(exc)
    except Exception as exc:
        if debug:
            raise
        detail = " ".join(str(exc).split())[:300]  # one line, whatever the exception says
        print(f"error: {type(exc).__name__}: {detail} (run with --debug for the traceback)", file=sys.stderr)
        sys.exit(1)
