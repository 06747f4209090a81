"""`kimivl ocr`: PDFs and images to Markdown, page by page, resumable.

`plan_pages` lists the pages, `open_sink` opens the output (and reads what `--resume` can
skip), `run_pages` does each page and appends it at once. The model enters only through a
`Generate` callable (see `pipeline`); `--method text` works without one.
A task: it reads `media`, calls `processor` and a backend, and `cli/ocr.py` drives it.
"""

from kimivl_cli.tasks.ocr.output import PageRecord, open_sink
from kimivl_cli.tasks.ocr.pipeline import (
    Generate,
    Generation,
    OcrOptions,
    PageJob,
    RunSummary,
    plan_pages,
    run_pages,
    terminate_as_interrupt,
)

__all__ = [
    "Generate",
    "Generation",
    "OcrOptions",
    "PageJob",
    "PageRecord",
    "RunSummary",
    "open_sink",
    "plan_pages",
    "run_pages",
    "terminate_as_interrupt",
]
