"""`kimivl ask`: inputs and a question in, one streamed answer out."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Optional

import typer

from kimivl_cli.cli.common import (
    DEFAULT_MODEL,
    DeviceOpt,
    JsonOpt,
    MaxTokensOpt,
    ModelOpt,
    PasswordOpt,
    QuantOpt,
    QuietOpt,
    SeedOpt,
    ShowThinkingOpt,
    TemperatureOpt,
    ThinkingBudgetOpt,
    TopPOpt,
)
from kimivl_cli.errors import InputError

if TYPE_CHECKING:
    from kimivl_cli.engine.engine import Engine
    from kimivl_cli.engine.sampling import SamplingParams
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


def system_prompt(system: str | None, prompt_file: Path | None) -> str:
    """--system, else --prompt-file, else prompts/ask.md."""
    from kimivl_cli.prompts import load_prompt

    if system is not None and prompt_file is not None:
        raise InputError("--system and --prompt-file both set the system prompt", "give one of them")
    return system if system is not None else load_prompt("ask.md", prompt_file).strip()


def sampling(
    engine: Engine,
    max_tokens: int | None,
    temperature: float | None,
    top_p: float | None,
    seed: int | None,
    thinking_budget: int | None,
) -> SamplingParams:
    """The checkpoint's defaults with the options the user gave."""
    return engine.defaults.with_overrides(
        max_new_tokens=max_tokens, temperature=temperature, top_p=top_p, seed=seed, thinking_budget=thinking_budget
    )


def context_budget(engine: Engine, params: SamplingParams, max_context: int | None) -> Budget:
    """The tokens a prompt may use: the model's context or --max-context, minus room for the reply."""
    from kimivl_cli.tasks.ask import Budget

    model_limit = engine.config.text.max_position_embeddings
    if max_context is not None and max_context < model_limit:
        limit, source = max_context, f"--max-context {max_context:,}"
    else:
        limit, source = model_limit, "the model's context"
    return Budget(limit, min(params.max_new_tokens, limit // 4), source)


def register(app: typer.Typer) -> None:
    @app.command("ask")
    def _command(
        args: Annotated[
            Optional[list[str]],
            typer.Argument(
                help="Images, PDFs, videos, text files or folders ('-' reads stdin), then the question.",
                metavar="[INPUT]... QUESTION",
                show_default=False,
            ),
        ] = None,
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
        show_thinking: ShowThinkingOpt = None,
        json: JsonOpt = False,
        jsonl: JsonlOpt = False,
        max_context: MaxContextOpt = None,
        model: ModelOpt = DEFAULT_MODEL,
        device: DeviceOpt = "auto",
        quant: QuantOpt = "none",
        quiet: QuietOpt = False,
    ) -> None:
        """Ask about images, PDFs, videos and text files; the question comes last (or on stdin).

        \b
        Examples:
          kimivl ask chart.png "Which quarter grew most?"
          kimivl ask manual.pdf --pages 3-5 "Summarise"
          kimivl ask talk.mp4 --frames 16 "When does the demo start?"
          cat scan.png | kimivl ask - "Transcribe" --json
          echo "What is this?" | kimivl ask photo.jpg
        """
        from kimivl_cli.render import Output
        from kimivl_cli.tasks.ask import MediaOptions, build_prompt, read_inputs, resolve, split_question
        from kimivl_cli.tasks.backend import open_engine

        output = Output(json=json, jsonl=jsonl, show_thinking=show_thinking, quiet=quiet)
        options = MediaOptions(pages=pages, password=password, frames=frames, fps=fps)
        inputs, question = split_question(args or [], sys.stdin.isatty(), lambda: sys.stdin.buffer.read())
        items = resolve(inputs)
        system_text = system_prompt(system, prompt_file)
        engine = open_engine(model, device, quant)
        params = sampling(engine, max_tokens, temperature, top_p, seed, thinking_budget)
        assert engine.tokenizer is not None  # Engine.load always has one
        with read_inputs(items, options, engine.image_config) as segments:
            prompt = build_prompt(
                segments,
                question,
                system=system_text,
                tokenizer=engine.tokenizer,
                image_config=engine.image_config,
                budget=context_budget(engine, params, max_context),
            )
        for note in prompt.notes:
            output.note(note)
        events = engine.generate(
            prompt.messages, prompt.images, params, show_thinking=show_thinking is not False, max_context=max_context
        )
        output.stream(events)
