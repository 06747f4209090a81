"""`kimivl ocr`: options in, `tasks.ocr` does the pages, a progress bar on a TTY.

The task (PyMuPDF, PIL) and the engine (torch) are imported inside the command, so
`kimivl --version` and `--help` pay for neither.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Optional

import typer

from kimivl_cli.cli.common import (
    DEFAULT_MODEL,
    DeviceOpt,
    MaxTokensOpt,
    ModelOpt,
    PasswordOpt,
    QuantOpt,
    QuietOpt,
    TemperatureOpt,
    ThinkingBudgetOpt,
)
from kimivl_cli.errors import InputError

if TYPE_CHECKING:
    from PIL import Image

    from kimivl_cli.tasks.ocr import Generate, Generation


def load_generate(
    model: str,
    device: str = "auto",
    quant: str = "none",
    *,
    max_tokens: int | None = None,
    temperature: float | None = None,
    thinking_budget: int | None = None,
) -> Generate:
    """The local engine behind the OCR seam: `(messages, images) -> Generation` with the answer only.

    A Thinking checkpoint's reasoning is dropped (its tokens still count in the usage): the page's
    Markdown is the answer part. Loads the weights now; `_LazyGenerate` calls this on the first
    page that needs the model.
    """
    from kimivl_cli.engine.events import AnswerDelta, Done
    from kimivl_cli.tasks.backend import open_engine
    from kimivl_cli.tasks.ocr import Generation

    engine = open_engine(model, device, quant)
    params = engine.defaults.with_overrides(
        max_new_tokens=max_tokens, temperature=temperature, thinking_budget=thinking_budget
    )

    def generate(messages: list[dict], images: list[Image.Image]) -> Generation:
        parts: list[str] = []
        prompt_tokens = completion_tokens = 0
        for event in engine.generate(messages, images, params, show_thinking=False):
            if isinstance(event, AnswerDelta):
                parts.append(event.text)
            elif isinstance(event, Done):
                prompt_tokens, completion_tokens = event.usage.prompt_tokens, event.usage.completion_tokens
        return Generation("".join(parts), prompt_tokens, completion_tokens)

    return generate


class _LazyGenerate:
    """Loads the model on the first page that needs it, so text-only runs never load it."""

    def __init__(self, model: str, device: str, quant: str, **sampling: int | float | None) -> None:
        self.model, self.device, self.quant, self.sampling = model, device, quant, sampling
        self.generate: Generate | None = None

    def __call__(self, messages: list[dict], images: list[Image.Image]) -> str | Generation:
        if self.generate is None:
            self.generate = load_generate(self.model, self.device, self.quant, **self.sampling)
        return self.generate(messages, images)


def register(app: typer.Typer) -> None:
    @app.command("ocr")
    def _command(
        inputs: Annotated[list[str], typer.Argument(help="PDFs, images or folders ('-' reads stdin).")],
        output: Annotated[Optional[Path], typer.Option("--output", "-o", help="Write here instead of stdout.")] = None,
        force: Annotated[bool, typer.Option("--force", help="Overwrite an existing OUT.")] = False,
        resume: Annotated[
            bool, typer.Option("--resume", help="Skip the pages already in OUT, append the rest.")
        ] = False,
        jsonl: Annotated[bool, typer.Option("--jsonl", help="One JSON record per page instead of Markdown.")] = False,
        method: Annotated[
            str, typer.Option("--method", help="auto (image + text-layer anchors), vision or text.")
        ] = "auto",
        pages: Annotated[Optional[str], typer.Option("--pages", help="Pages of each PDF, e.g. 1-3,7.")] = None,
        dpi: Annotated[
            Optional[float], typer.Option("--dpi", help="Render PDF pages at this DPI.", min=10, max=1200)
        ] = None,
        max_side: Annotated[
            Optional[int], typer.Option("--max-side", help="Render PDF pages with this longest side (pixels).", min=28)
        ] = None,
        password: PasswordOpt = None,
        keep_headers: Annotated[
            bool, typer.Option("--keep-headers", help="Keep running headers, footers, page numbers.")
        ] = False,
        prompt_file: Annotated[
            Optional[Path],
            typer.Option("--prompt-file", help="Instruction to use instead of prompts/ocr.md ({anchors} placeholder)."),
        ] = None,
        model: ModelOpt = DEFAULT_MODEL,
        device: DeviceOpt = "auto",
        quant: QuantOpt = "none",
        max_tokens: MaxTokensOpt = None,
        temperature: TemperatureOpt = None,
        thinking_budget: ThinkingBudgetOpt = None,
        quiet: QuietOpt = False,
    ) -> None:
        """OCR PDFs and images to Markdown, one page at a time (resumable with -o OUT --resume).

        Example: kimivl ocr scan.pdf --pages 1-10 -o scan.md
        """
        from kimivl_cli.media import MediaKind, resolve_inputs
        from kimivl_cli.prompts import load_prompt
        from kimivl_cli.tasks.ocr import OcrOptions, open_sink, plan_pages, run_pages

        if method not in ("auto", "vision", "text"):
            raise InputError(f"unknown --method {method!r}", "use auto, vision or text")
        if dpi and max_side:
            raise InputError("--dpi and --max-side both set the page size", "give one of them")
        if prompt_file is not None:
            load_prompt("ocr.md", prompt_file)  # unreadable: fail before any page is written
        options = OcrOptions(method, pages, dpi, max_side, password, keep_headers, prompt_file)  # type: ignore[arg-type]
        jobs = plan_pages(resolve_inputs(inputs, kinds={MediaKind.IMAGE, MediaKind.PDF}), options)
        sink, done = open_sink(output, "jsonl" if jsonl else "markdown", force=force, resume=resume)
        todo = sum(job.key not in done for job in jobs)
        generate = _LazyGenerate(
            model, device, quant, max_tokens=max_tokens, temperature=temperature, thinking_budget=thinking_budget
        )
        try:
            if quiet or not sys.stderr.isatty():
                count = run_pages(jobs, options, sink, generate, done)
            else:
                count = _with_progress(jobs, options, sink, generate, done, todo)
        except KeyboardInterrupt:
            # Every finished page is already on disk. Exit here: Typer turns a KeyboardInterrupt into
            # a *returned* 130 in non-standalone mode, which `cli.main` does not pass on yet.
            print(f"interrupted: finished pages are in {output or 'stdout'}", file=sys.stderr)
            sys.exit(130)
        finally:
            sink.close()
        if not quiet and output is not None:
            print(f"{count} pages written to {output} ({len(done)} already there)", file=sys.stderr)


def _with_progress(jobs, options, sink, generate, done, todo: int) -> int:
    """`run_pages` under a Rich bar on stderr: pages done/total, pages/s, ETA."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from kimivl_cli.tasks.ocr import run_pages

    columns = (
        TextColumn("ocr"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[rate]}"),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=Console(stderr=True), transient=True) as progress:
        task = progress.add_task("ocr", total=todo, rate="")

        def advance(_record: object) -> None:
            progress.advance(task)
            speed = progress.tasks[0].speed
            progress.update(task, rate=f"{speed:.2f} pages/s" if speed else "")

        return run_pages(jobs, options, sink, generate, done, on_page=advance)
