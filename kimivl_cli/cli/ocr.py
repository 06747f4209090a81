"""`kimivl ocr`: options in, `tasks.ocr` does the pages, a progress bar on a TTY.

The task (PyMuPDF, PIL) and the engine (torch) are imported inside the command, so
`kimivl --version` and `--help` pay for neither.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from kimivl_cli.backends import ChatBackend, ChatOptions
from kimivl_cli.cli.common import (
    ConcurrencyOpt,
    ForceOpt,
    PasswordOpt,
    QuietOpt,
    backend_options,
    batch_answerer,
    sampling_options,
)
from kimivl_cli.errors import InputError


def register(app: typer.Typer) -> None:
    @app.command("ocr")
    @backend_options
    @sampling_options
    def _command(
        inputs: Annotated[list[str], typer.Argument(help="PDFs, images or folders ('-' reads stdin).")],
        output: Annotated[Optional[Path], typer.Option("--output", "-o", help="Write here instead of stdout.")] = None,
        force: ForceOpt = False,
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
        concurrency: ConcurrencyOpt = 1,
        quiet: QuietOpt = False,
        *,
        backend: ChatBackend,
        sampling: ChatOptions,
    ) -> None:
        """OCR PDFs and images to Markdown, page by page, in order (resumable with -o OUT --resume).

        \b
        Examples:
          kimivl ocr scan.pdf --pages 1-10 -o scan.md
          kimivl ocr archive/ --backend openai --api-base http://gpu:8000/v1 -j 16 --jsonl -o all.jsonl --resume
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
        generate, concurrency = batch_answerer(backend, sampling, concurrency, quiet)
        interrupted = False
        try:
            if quiet or not sys.stderr.isatty():
                count = run_pages(jobs, options, sink, generate, done, concurrency=concurrency)
            else:
                count = _with_progress(jobs, options, sink, generate, done, todo, concurrency)
        except KeyboardInterrupt:
            interrupted = True
        finally:
            sink.close()
        if interrupted:
            # Every finished page is already on disk. Exit here: Typer turns a KeyboardInterrupt into
            # a *returned* 130 in non-standalone mode, which `cli.main` does not pass on yet.
            print(f"interrupted: finished pages are in {output or 'stdout'}", file=sys.stderr, flush=True)
            if concurrency > 1:  # requests still running in pool threads: abandon them (--resume redoes their pages)
                sys.stdout.flush()
                os._exit(130)
            sys.exit(130)
        if not quiet and output is not None:
            print(f"{count} pages written to {output} ({len(done)} already there)", file=sys.stderr)


def _with_progress(jobs, options, sink, generate, done, todo: int, concurrency: int) -> int:
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

        return run_pages(jobs, options, sink, generate, done, on_page=advance, concurrency=concurrency)
