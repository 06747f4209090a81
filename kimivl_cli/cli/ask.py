"""`kimivl ask`: inputs and a question in, one streamed answer out."""

from __future__ import annotations

import sys
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Optional

import typer

from kimivl_cli.backends import ChatBackend, ChatOptions
from kimivl_cli.cli.common import (
    ApiBaseOpt,
    ApiKeyOpt,
    BackendModelOpt,
    BackendOpt,
    DeviceOpt,
    JsonOpt,
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
from kimivl_cli.cli.flags import flag, with_flags
from kimivl_cli.errors import InputError

if TYPE_CHECKING:
    from kimivl_cli.processor.image import ImageProcessorConfig
    from kimivl_cli.processor.tokenizer import Tokenizer
    from kimivl_cli.tasks.ask import Budget

SystemOpt = Annotated[Optional[str], typer.Option("--system", help="System prompt (default: prompts/ask.md).")]
PromptFileOpt = Annotated[
    Optional[Path], typer.Option("--prompt-file", help="Read the system prompt from this file.", dir_okay=False)
]
JsonlOpt = Annotated[bool, typer.Option("--jsonl", help="Stream one JSON event per line.")]
MaxContextOpt = Annotated[
    Optional[int],
    typer.Option("--max-context", help="Most prompt + reply tokens (default: the model's context).", min=64),
]
PagesOpt = Annotated[Optional[str], typer.Option("--pages", help="Pages of each PDF, e.g. 1-3,7.")]
FramesOpt = Annotated[
    Optional[int], typer.Option("--frames", help="Frames sampled from each video (default 8).", min=1)
]
FpsOpt = Annotated[Optional[float], typer.Option("--fps", help="Sample video frames at this rate instead.", min=0.001)]
SchemaOpt = Annotated[
    Optional[str],
    typer.Option(
        "--schema",
        help="Answer with JSON valid against this JSON Schema: a file, inline JSON, or fields like 'name, age int'.",
    ),
]
JsonModeOpt = Annotated[bool, typer.Option("--json-mode", help="Answer with a JSON object (no schema).")]


def system_prompt(system: str | None, prompt_file: Path | None) -> str:
    """--system, else --prompt-file, else prompts/ask.md."""
    from kimivl_cli.prompts import load_prompt

    if system is not None and prompt_file is not None:
        raise InputError("--system and --prompt-file both set the system prompt", "give one of them")
    return system if system is not None else load_prompt("ask.md", prompt_file).strip()


def prompt_fitting(
    backend: ChatBackend, sampling: ChatOptions, max_context: int | None
) -> tuple[ImageProcessorConfig, Tokenizer | None, Budget | None]:
    """How prompts are sized for `backend`: its image processor, and the tokenizer and budget to fit PDFs.

    The local engine counts tokens exactly, against its context or --max-context less room for
    the reply. A server has no tokenizer here: images go at the official processor's size and
    the server applies its own context limit (a prompt too long comes back as a clear error).
    """
    from kimivl_cli.tasks.ask import Budget

    limit = backend.context_limit(sampling)
    if limit is None:
        if max_context is not None:
            raise InputError("--max-context needs --backend local", "the server applies its own context limit")
        return backend.image_config, None, None
    if max_context is not None and max_context < limit.context:
        tokens, source = max_context, f"--max-context {max_context:,}"
    else:
        tokens, source = limit.context, "the model's context"
    return backend.image_config, backend.tokenizer, Budget(tokens, min(limit.reply, tokens // 4), source)


def ask_command(
    args: Annotated[
        Optional[list[str]],
        typer.Argument(
            help="Images, PDFs, videos, text files or folders ('-' reads stdin), then the question.",
            metavar="[INPUT]... QUESTION",
            show_default=False,
        ),
    ] = None,
    show_thinking: ShowThinkingOpt = None,
    json: JsonOpt = False,
    jsonl: JsonlOpt = False,
    schema: SchemaOpt = None,
    json_mode: JsonModeOpt = False,
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
    """Ask about images, PDFs, videos and text files; the question comes last (or on stdin).

    \b
    Examples:
      kimivl ask chart.png "Which quarter grew most?"
      kimivl ask manual.pdf --pages 3-5 "Summarise"
      kimivl ask talk.mp4 --frames 16 "When does the demo start?"
      cat scan.png | kimivl ask - "Transcribe" --json
      echo "What is this?" | kimivl ask photo.jpg
      kimivl ask invoice.pdf "Extract it" --schema 'vendor, total float, date: ISO 8601'
      kimivl ask scan.png "Transcribe" --backend openai --api-base http://gpu:8000/v1
    """
    from kimivl_cli.render import Output, Transcript
    from kimivl_cli.tasks.ask import MediaOptions, build_prompt, folder_note, read_inputs, resolve, split_question
    from kimivl_cli.tasks.structured import json_format

    chat = open_chat_backend(backend, api_base, api_key, model, device, quant, quiet)
    sampling = chat_options(max_tokens, temperature, top_p, seed, thinking_budget)
    media = MediaOptions(pages, password, frames, fps)
    instructions = system_prompt(system, prompt_file)
    output = Output(json=json, jsonl=jsonl, show_thinking=show_thinking, quiet=quiet, name_field=flag)
    answer_format = json_format(schema, json_mode)
    inputs, question = split_question(args or [], sys.stdin.isatty(), lambda: sys.stdin.buffer.read())
    skipped: list[str] = []
    items = resolve(inputs, skipped)
    if note := folder_note(inputs, items, skipped):
        output.note(f"note: {note}")
    image_config, tokenizer, budget = prompt_fitting(chat, sampling, max_context)
    for note in chat.option_notes(sampling):
        output.note(f"note: {with_flags(note)}")
    with read_inputs(items, media, image_config) as (segments, capped):
        for note in capped:
            output.note(f"note: {with_flags(note)}")
        prompt = build_prompt(
            segments, question, system=instructions, tokenizer=tokenizer, image_config=image_config, budget=budget
        )
    for note in prompt.notes:
        output.note(with_flags(note))
    options = replace(sampling, show_thinking=output.wants_thinking, max_context=max_context, json_format=answer_format)
    transcript = Transcript(
        model=chat.name,
        notes=[*map(with_flags, chat.notes), *output.notes],
        inputs={"sent": [item.name for item in items], "skipped": skipped},
    )
    output.stream(chat.chat(prompt.messages, prompt.images, options), transcript)


def register(app: typer.Typer) -> None:
    app.command("ask")(ask_command)
