"""`kimivl chat`: a multi-turn conversation about images, PDFs and videos (a REPL; see `tasks.chat`).

On a terminal: a `›` prompt with line editing, answers streamed with Rich. With stdin not a
terminal it reads one line per turn and prints plain text, so a script can drive it. A bad
command or input prints one `error:` line and the conversation goes on; Ctrl-C stops the
answer being written (what was shown stays in the history), Ctrl-C at the prompt leaves (130).
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Optional

import typer

from kimivl_cli.backends import ChatBackend, ChatOptions
from kimivl_cli.cli.ask import (
    JsonlOpt,
    MaxContextOpt,
    media_options,
    prompt_fitting,
    system_options,
)
from kimivl_cli.cli.common import QuietOpt, ShowThinkingOpt, backend_options, sampling_options
from kimivl_cli.errors import InputError, KimivlError, Terminated

if TYPE_CHECKING:
    from kimivl_cli.tasks.ask import MediaOptions

PROMPT = "› "


def _line_reader(interactive: bool) -> Callable[[], str]:
    """input() with line editing on a terminal; plain lines from a pipe. Raises EOFError at the end."""
    if interactive:
        with contextlib.suppress(ImportError):
            import readline  # noqa: F401  (importing it gives input() editing and history)
        return lambda: input(PROMPT)

    def read() -> str:
        line = sys.stdin.readline()
        if not line:
            raise EOFError
        return line

    return read


def register(app: typer.Typer) -> None:
    @app.command("chat")
    @backend_options
    @sampling_options
    @media_options
    @system_options
    def _command(
        inputs: Annotated[
            Optional[list[str]],
            typer.Argument(help="Images, PDFs, videos or text files for the first question.", metavar="INPUT"),
        ] = None,
        show_thinking: ShowThinkingOpt = None,
        json: Annotated[bool, typer.Option("--json", help="Print one JSON object per answer, a line each.")] = False,
        jsonl: JsonlOpt = False,
        max_context: MaxContextOpt = None,
        quiet: QuietOpt = False,
        *,
        backend: ChatBackend,
        sampling: ChatOptions,
        media: MediaOptions,
        system: str,
    ) -> None:
        """Chat about images, PDFs and videos; /help lists the commands.

        \b
        Commands: /image PATH, /pdf PATH [PAGES], /reset, /save FILE, /load FILE, /thinking on|off,
                  /help, /exit
        Piped in, each line is a question (or a command) and each answer is followed by a blank
        line; --json gives one object per answer, --jsonl its events.
        Example:  kimivl chat report.pdf --pages 1-3
        """
        from kimivl_cli.render import Output, Transcript
        from kimivl_cli.tasks.backend import sampling_notes
        from kimivl_cli.tasks.chat import HELP, Conversation, parse_command

        output = Output(json=json, jsonl=jsonl, show_thinking=show_thinking, quiet=quiet)
        interactive = sys.stdin.isatty()
        if "-" in (inputs or []) and not interactive:
            raise InputError("chat reads its questions from stdin, so '-' cannot be an input", "pass a file path")
        image_config = prompt_fitting(backend, sampling, max_context)[0]
        ignored = sampling_notes(backend, sampling)
        for note in ignored:
            output.note(f"note: {note}")
        conversation = Conversation(system, image_config, media)
        if inputs:
            output.note(conversation.attach(inputs))
        if interactive and not quiet:
            output.note(f"kimivl chat with {backend.name} · /help for commands, /exit or Ctrl-D to leave")
        read = _line_reader(interactive)
        failure: KimivlError | None = None
        while True:
            try:
                line = read().strip()
            except EOFError:
                break
            except KeyboardInterrupt:
                output.note("")
                raise typer.Exit(130) from None
            if not line:
                continue
            try:
                command = parse_command(line)
                if command is None:
                    messages, images = conversation.request(line)
                    transcript = Transcript(model=backend.name, notes=[*backend.notes, *ignored])
                    try:
                        options = replace(sampling, show_thinking=output.wants_thinking, max_context=max_context)
                        output.stream(backend.chat(messages, images, options), transcript)
                        if output.style == "plain" and not interactive:
                            output.stdout.file.write("\n")  # a blank line between answers, for readers and scripts
                    except KeyboardInterrupt as exc:
                        if isinstance(exc, Terminated):  # SIGTERM ends the chat; Ctrl-C only the answer
                            raise
                        output.note("interrupted")
                    except KimivlError:
                        # e.g. the attachments overflow the context: drop them, or every question would fail
                        if dropped := conversation.drop_pending():
                            output.note(f"dropped the attachments ({', '.join(dropped)}); attach fewer pages or frames")
                        raise
                    conversation.commit(line, transcript.thinking, transcript.answer)
                elif command.name in ("exit", "quit"):
                    break
                elif command.name == "help":
                    output.stderr.print(HELP, markup=False, highlight=False)
                elif command.name == "reset":
                    conversation.reset()
                    output.note("conversation cleared")
                elif command.name == "image":
                    output.note(conversation.attach(command.args))
                elif command.name == "pdf":
                    if len(command.args) not in (1, 2):
                        raise InputError("usage: /pdf PATH [PAGES]", "e.g. /pdf manual.pdf 3-5")
                    page_spec = command.args[1] if len(command.args) == 2 else None
                    output.note(conversation.attach(command.args[:1], page_spec))
                elif command.name in ("save", "save!"):
                    if len(command.args) != 1:
                        raise InputError(f"usage: /{command.name} FILE")
                    path = conversation.save(Path(command.args[0]), backend.name, overwrite=command.name == "save!")
                    output.note(f"saved {len(conversation.history) // 2} exchanges to {path}")
                elif command.name == "load":
                    if len(command.args) != 1:
                        raise InputError("usage: /load FILE", "a file written by /save")
                    output.note(conversation.load(command.args[0]))
                elif command.name == "thinking":
                    if command.args not in (("on",), ("off",)):
                        raise InputError("usage: /thinking on|off")
                    output.show_thinking = command.args[0] == "on"
                    output.note(f"thinking {'shown' if output.show_thinking else 'hidden'}")
            except KimivlError as exc:
                failure = exc
                print(f"error: {exc.one_line()}", file=sys.stderr, flush=True)
        if failure is not None and not interactive:
            raise typer.Exit(failure.exit_code)  # a script learns that a step failed
