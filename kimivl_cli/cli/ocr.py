"""`kimivl ocr`: options in, `tasks.ocr` does the pages; a bar on a terminal, nothing on a pipe.

The task (PyMuPDF, PIL) and the engine (torch) are imported inside the command, so
`kimivl --version` and `--help` pay for neither.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from kimivl_cli.cli.common import (
    ApiBaseOpt,
    ApiKeyOpt,
    BackendModelOpt,
    BackendOpt,
    ConcurrencyOpt,
    DeviceOpt,
    ForceOpt,
    MaxTokensOpt,
    PasswordOpt,
    QuantOpt,
    QuietOpt,
    SeedOpt,
    TemperatureOpt,
    ThinkingBudgetOpt,
    TopPOpt,
    batch_answerer,
    chat_options,
    open_chat_backend,
)
from kimivl_cli.errors import InputError

LISTED = 8  # pages named in one note before "and N more"


def ocr_command(
    inputs: Annotated[list[str], typer.Argument(help="PDFs, images or folders ('-' reads stdin).")],
    output: Annotated[
        Optional[str],
        typer.Option(
            "--output", "-o", help="Write here instead of stdout; a folder (ending in /) gets a file per input."
        ),
    ] = None,
    force: ForceOpt = False,
    resume: Annotated[bool, typer.Option("--resume", help="Skip the pages already in OUT, append the rest.")] = False,
    redo_truncated: Annotated[
        bool,
        typer.Option(
            "--redo-truncated", help="With --resume: redo the pages cut at the token limit (raise --max-tokens)."
        ),
    ] = False,
    jsonl: Annotated[bool, typer.Option("--jsonl", help="One JSON record per page instead of Markdown.")] = False,
    method: Annotated[
        str,
        typer.Option(
            "--method", help="auto (each page to the text path or the model, by its content), vision or text."
        ),
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
    verbose: Annotated[
        bool, typer.Option("--verbose", "-v", help="Without a terminal: one line per page on stderr.")
    ] = False,
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
    """OCR PDFs and images to Markdown, page by page, in order (resumable with -o OUT --resume).

    \b
    Examples:
      kimivl ocr scan.pdf --pages 1-10 -o scan.md
      kimivl ocr paper.pdf --method text                 # no model: the text layer only
      kimivl ocr archive/ -o out/ --resume               # one Markdown file per input
      kimivl ocr archive/ --backend openai --api-base http://gpu:8000/v1 -j 16 --jsonl -o all.jsonl --resume
    """
    from kimivl_cli.media import MediaKind, resolve_inputs
    from kimivl_cli.prompts import load_prompt
    from kimivl_cli.tasks.ocr import OcrOptions, plan_pages

    if method not in ("auto", "vision", "text"):
        raise InputError(f"unknown --method {method!r}", "use auto, vision or text")
    if dpi and max_side:
        raise InputError("--dpi and --max-side both set the page size", "give one of them")
    if redo_truncated and not resume:
        raise InputError("--redo-truncated works with --resume", "add --resume -o OUT")
    if prompt_file is not None:
        load_prompt("ocr.md", prompt_file)  # unreadable: fail before any page is written
    options = OcrOptions(method, pages, dpi, max_side, password, keep_headers, prompt_file)  # type: ignore[arg-type]
    sources = resolve_inputs(inputs, kinds={MediaKind.IMAGE, MediaKind.PDF})
    fmt = "jsonl" if jsonl else "markdown"
    targets = _targets(sources, output, fmt)
    runs = [(target, plan_pages(group, options)) for target, group in targets]
    generate = None
    if method != "text":
        generate, concurrency = batch_answerer(
            open_chat_backend(backend, api_base, api_key, model, device, quant, quiet),
            chat_options(max_tokens, temperature, top_p, seed, thinking_budget),
            concurrency,
            quiet,
        )
    _run(runs, options, fmt, generate, concurrency, force, resume, redo_truncated, quiet, verbose, output)


def _targets(sources: list, output: str | None, fmt: str) -> list[tuple[Path | None, list]]:
    """(output file, inputs) pairs: everything to one file or stdout, or one file per input in a folder."""
    if output is None or not (output.endswith(("/", os.sep)) or Path(output).is_dir()):
        return [(Path(output) if output else None, sources)]
    folder = Path(output)
    if folder.exists() and not folder.is_dir():
        raise InputError(f"{folder} is a file, not a folder", "drop the trailing / to write one file")
    suffix = ".jsonl" if fmt == "jsonl" else ".md"
    targets: dict[Path, list] = {}
    for source in sources:
        name = "stdin" if source.path is None else Path(source.name).stem
        path = folder / (name + suffix)
        if path in targets:
            raise InputError(
                f"two inputs would both write {path}", "rename one, or write them to one file with -o FILE"
            )
        targets[path] = [source]
    folder.mkdir(parents=True, exist_ok=True)
    return list(targets.items())


def _run(runs, options, fmt, generate, concurrency, force, resume, redo_truncated, quiet, verbose, output) -> None:
    from kimivl_cli.tasks.ocr import RunSummary, open_sink, run_pages, terminate_as_interrupt

    sinks = [
        (open_sink(target, fmt, force=force, resume=resume, redo_truncated=redo_truncated), jobs)
        for target, jobs in runs
    ]
    todo = sum(job.key not in done for (_, done), jobs in sinks for job in jobs)
    total = RunSummary()
    already = sum(len(done) for (_, done), _ in sinks)
    progress = _Progress(todo, quiet, verbose)
    interrupted = None
    try:
        with terminate_as_interrupt(), progress:
            for (sink, done), jobs in sinks:
                try:
                    summary = run_pages(jobs, options, sink, generate, done, progress.page, concurrency)
                finally:
                    sink.close()
                total.merge(summary)
    except KeyboardInterrupt as exc:
        interrupted = exc
    if interrupted is not None:
        # Every finished page is already on disk. Exit here: Typer turns a KeyboardInterrupt into
        # a *returned* 130 in non-standalone mode, which `cli.main` does not pass on yet.
        word, code = ("terminated", 143) if str(interrupted) == "SIGTERM" else ("interrupted", 130)
        print(f"{word}: finished pages are in {output or 'stdout'}", file=sys.stderr, flush=True)
        if concurrency > 1:  # requests still running in pool threads: abandon them (--resume redoes their pages)
            sys.stdout.flush()
            os._exit(code)
        sys.exit(code)
    _report(total, options.method, quiet)
    if not quiet and output is not None:
        print(f"{total.written} pages written to {output} ({already} already there)", file=sys.stderr)
    if total.unwritten:
        raise SystemExit(1)


def _pages(items: list) -> str:
    named = ", ".join(f"{Path(file).name} p{page} ({why})" for (file, page), why in items[:LISTED])
    return named + (f" and {len(items) - LISTED} more" if len(items) > LISTED else "")


def _report(summary, method: str, quiet: bool) -> None:
    """The notes after a run: pages that wanted the model, truncated pages, unwritten pages (an error)."""
    if summary.model_error and not quiet:
        print(f"note: the model could not be loaded ({summary.model_error})", file=sys.stderr)
    if summary.via_text and not quiet:
        why = "with --method text" if method == "text" else "without the model"
        print(
            f"note: {len(summary.via_text)} pages written from their text layer {why} would do better with the model: "
            f"{_pages(summary.via_text)}",
            file=sys.stderr,
        )
    if summary.truncated:
        names = ", ".join(f"{Path(f).name} p{p}" for f, p in summary.truncated[:LISTED])
        print(
            f"warning: {len(summary.truncated)} pages were cut at the token limit ({names}); "
            "redo them with --resume --redo-truncated and a higher --max-tokens",
            file=sys.stderr,
        )
    if summary.unwritten:
        print(
            f"error: {len(summary.unwritten)} pages need the model and were not written: {_pages(summary.unwritten)}; "
            "run with a model (--model, or --backend openai), then --resume",
            file=sys.stderr,
        )


class _Progress:
    """A Rich bar on a terminal (pages, pages/s, ETA, the last page's method); with --verbose and
    no terminal, one line per page; otherwise nothing."""

    def __init__(self, todo: int, quiet: bool, verbose: bool) -> None:
        self.todo, self.bar, self.task = todo, None, None
        self.lines = verbose and not quiet and not sys.stderr.isatty()
        if not quiet and sys.stderr.isatty():
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            columns = (
                TextColumn("ocr"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[rate]}"),
                TimeRemainingColumn(),
                TextColumn("{task.fields[method]}"),
            )
            self.bar = Progress(*columns, console=Console(stderr=True), transient=True)

    def __enter__(self) -> _Progress:
        if self.bar is not None:
            self.bar.__enter__()
            self.task = self.bar.add_task("ocr", total=self.todo, rate="", method="")
        return self

    def __exit__(self, *exc: object) -> None:
        if self.bar is not None:
            self.bar.__exit__(*exc)

    def page(self, record) -> None:
        if self.bar is not None:
            self.bar.advance(self.task)
            speed = self.bar.tasks[0].speed
            self.bar.update(self.task, rate=f"{speed:.2f} pages/s" if speed else "", method=record.method)
        elif self.lines:
            why = f" ({record.reason})" if record.reason else ""
            print(f"ocr: {record.file} page {record.page}: {record.method}{why} {record.seconds:.2f}s", file=sys.stderr)


def register(app: typer.Typer) -> None:
    app.command("ocr")(ocr_command)
