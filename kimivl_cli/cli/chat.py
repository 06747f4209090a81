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
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Annotated, Optional

import typer

from kimivl_cli.backends import ChatBackend, ChatOptions
from kimivl_cli.cli.ask import (
    FpsOpt,
    FramesOpt,
    JsonlOpt,
    MaxContextOpt,
    PagesOpt,
    PromptFileOpt,
    SystemOpt,
    prompt_fitting,
    system_prompt,
)
from kimivl_cli.cli.common import (
    ApiBaseOpt,
    ApiKeyOpt,
    BackendModelOpt,
    BackendOpt,
    DeviceOpt,
    MaxTokensOpt,
    PasswordOpt,
    QuantOpt,
    QuietOpt,
    SeedOpt,
    ShowThinkingOpt,
    TemperatureOpt,
    ThinkingBudgetOpt,
    TopPOpt,
    chat_options,
    open_chat_backend,
)
from kimivl_cli.cli.flags import error_line, flag, with_flags
from kimivl_cli.errors import InputError, KimivlError, Terminated

if TYPE_CHECKING:
    from kimivl_cli.render import Output
    from kimivl_cli.tasks.chat import Conversation, Reply

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


def chat_command(
    inputs: Annotated[
        Optional[list[str]],
        typer.Argument(help="Images, PDFs, videos or text files for the first question.", metavar="INPUT"),
    ] = None,
    show_thinking: ShowThinkingOpt = None,
    json: Annotated[bool, typer.Option("--json", help="Print one JSON object per answer, a line each.")] = False,
    jsonl: JsonlOpt = False,
    max_context: MaxContextOpt = None,
    quiet: QuietOpt = False,
    system: SystemOpt = None,
    prompt_file: PromptFileOpt = None,
    pages: PagesOpt = None,
    password: PasswordOpt = None,
    frames: FramesOpt = None,
    fps: FpsOpt = None,
    max_tokens: MaxTokensOpt = None,
    temperature: TemperatureOpt = None,
    top_p: TopPOpt = None,
    seed: SeedOpt = None,
    thinking_budget: ThinkingBudgetOpt = None,
    backend: BackendOpt = "local",
    api_base: ApiBaseOpt = None,
    api_key: ApiKeyOpt = None,
    model: BackendModelOpt = None,
    device: DeviceOpt = "auto",
    quant: QuantOpt = "auto",
) -> None:
    """Chat about images, PDFs and videos; /help lists the commands.

    \b
    Commands: /image PATH, /pdf PATH [PAGES], /reset, /save FILE, /load FILE, /thinking on|off,
              /help, /exit
    Piped in, each line is a question (or a command) and each answer is followed by a blank
    line; --json gives one object per answer, --jsonl its events.
    Example:  kimivl chat report.pdf --pages 1-3
    """
    from kimivl_cli.render import Output
    from kimivl_cli.tasks.ask import MediaOptions
    from kimivl_cli.tasks.chat import Conversation

    chat_backend = open_chat_backend(backend, api_base, api_key, model, device, quant, quiet)
    sampling = chat_options(max_tokens, temperature, top_p, seed, thinking_budget)
    media = MediaOptions(pages, password, frames, fps)
    instructions = system_prompt(system, prompt_file)
    output = Output(json=json, jsonl=jsonl, show_thinking=show_thinking, quiet=quiet, name_field=flag)
    interactive = sys.stdin.isatty()
    if "-" in (inputs or []) and not interactive:
        raise InputError("chat reads its questions from stdin, so '-' cannot be an input", "pass a file path")
    image_config = prompt_fitting(chat_backend, sampling, max_context)[0]
    ignored = [with_flags(note) for note in chat_backend.option_notes(sampling)]
    for note in ignored:
        output.note(f"note: {note}")
    conversation = Conversation(instructions, image_config, media)
    if inputs:
        output.note(conversation.attach(inputs))
    if interactive and not quiet:
        output.note(f"kimivl chat with {chat_backend.name} · /help for commands, /exit or Ctrl-D to leave")
    options = replace(sampling, max_context=max_context)
    session = _Session(output, conversation, chat_backend, options, ignored, interactive)
    failure = session.run(_line_reader(interactive))
    if failure is not None and not interactive:
        raise typer.Exit(failure.exit_code)  # a script learns that a step failed


@dataclass
class _Session:
    """The REPL: each line is a question for the backend or a /command for the conversation."""

    output: Output
    conversation: Conversation
    backend: ChatBackend
    sampling: ChatOptions
    ignored: list[str]
    interactive: bool

    def run(self, read: Callable[[], str]) -> KimivlError | None:
        """Lines until EOF or /exit; a failed line prints one `error:` line and the chat goes on.
        -> the last failure (None if none)."""
        from kimivl_cli.tasks.chat import parse_command, run_command

        failure: KimivlError | None = None
        while (line := self._next_line(read)) is not None:
            try:
                command = parse_command(line)
                if command is None:
                    self.answer(line)
                elif self._show(run_command(self.conversation, command, self.backend.name)):
                    break
            except KimivlError as exc:
                failure = exc
                print(error_line(exc), file=sys.stderr, flush=True)
        return failure

    def _next_line(self, read: Callable[[], str]) -> str | None:
        """The next non-empty line, None at the end; Ctrl-C at the prompt leaves with 130."""
        while True:
            try:
                line = read().strip()
            except EOFError:
                return None
            except KeyboardInterrupt:
                self.output.note("")
                raise typer.Exit(130) from None
            if line:
                return line

    def answer(self, question: str) -> None:
        """Stream the backend's answer and record the exchange; Ctrl-C stops the answer only."""
        from kimivl_cli.render import Transcript

        messages, images = self.conversation.request(question)
        transcript = Transcript(model=self.backend.name, notes=[*map(with_flags, self.backend.notes), *self.ignored])
        try:
            options = replace(self.sampling, show_thinking=self.output.wants_thinking)
            self.output.stream(self.backend.chat(messages, images, options), transcript)
            if self.output.style == "plain" and not self.interactive:
                self.output.stdout.file.write("\n")  # a blank line between answers, for readers and scripts
        except KeyboardInterrupt as exc:
            if isinstance(exc, Terminated):  # SIGTERM ends the chat; Ctrl-C only the answer
                raise
            self.output.note("interrupted")
        except KimivlError:
            # e.g. the attachments overflow the context: drop them, or every question would fail
            if dropped := self.conversation.drop_pending():
                self.output.note(f"dropped the attachments ({', '.join(dropped)}); attach fewer pages or frames")
            raise
        self.conversation.commit(question, transcript.thinking, transcript.answer)

    def _show(self, reply: Reply) -> bool:
        """Apply a command's reply to the view; -> True to leave."""
        from kimivl_cli.tasks.chat import HELP

        if reply.show_help:
            self.output.stderr.print(HELP, markup=False, highlight=False)
        if reply.show_thinking is not None:
            self.output.show_thinking = reply.show_thinking
        if reply.note:
            self.output.note(reply.note)
        return reply.leave


def register(app: typer.Typer) -> None:
    app.command("chat")(chat_command)
