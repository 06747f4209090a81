"""`kimivl ocr`: options in, `tasks.ocr` does the pages, a progress bar on a TTY."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from PIL import Image

from kimivl_cli.cli.common import DeviceOpt, ModelOpt, QuietOpt
from kimivl_cli.errors import InputError, RuntimeFailure
from kimivl_cli.tasks.ocr import Generate, Generation, OcrOptions, open_sink, plan_pages, run_pages
from kimivl_cli.tasks.ocr._media_stopgap import resolve_inputs


def load_generate(model: str, device: str) -> Generate:
    """The engine behind the OCR seam. Not wired yet: the lead connects `engine` here."""
    raise RuntimeFailure(
        "the local generation engine is not available in this build yet", "use --method text for text PDFs"
    )


class _LazyGenerate:
    """Loads the model on the first page that needs it, so text-only runs never load it."""

    def __init__(self, model: str, device: str) -> None:
        self.model, self.device = model, device
        self.generate: Generate | None = None

    def __call__(self, messages: list[dict], images: list[Image.Image]) -> str | Generation:
        if self.generate is None:
            self.generate = load_generate(self.model, self.device)
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
        password: Annotated[Optional[str], typer.Option("--password", help="Password of encrypted PDFs.")] = None,
        keep_headers: Annotated[
            bool, typer.Option("--keep-headers", help="Keep running headers, footers, page numbers.")
        ] = False,
        model: ModelOpt = "moonshotai/Kimi-VL-A3B-Thinking-2506",
        device: DeviceOpt = "auto",
        quiet: QuietOpt = False,
    ) -> None:
        """OCR PDFs and images to Markdown, one page at a time (resumable with -o OUT --resume).

        Example: kimivl ocr scan.pdf --pages 1-10 -o scan.md
        """
        if method not in ("auto", "vision", "text"):
            raise InputError(f"unknown --method {method!r}", "use auto, vision or text")
        if dpi and max_side:
            raise InputError("--dpi and --max-side both set the page size", "give one of them")
        options = OcrOptions(method, pages, dpi, max_side, password, keep_headers)  # type: ignore[arg-type]
        jobs = plan_pages(resolve_inputs(inputs), options)
        sink, done = open_sink(output, "jsonl" if jsonl else "markdown", force=force, resume=resume)
        todo = sum(job.key not in done for job in jobs)
        try:
            if quiet or not sys.stderr.isatty():
                count = run_pages(jobs, options, sink, _LazyGenerate(model, device), done)
            else:
                count = _with_progress(jobs, options, sink, _LazyGenerate(model, device), done, todo)
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
