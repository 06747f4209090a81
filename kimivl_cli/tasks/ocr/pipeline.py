"""Page planning and the page loop of `kimivl ocr`.

The model is a seam: `Generate` is any callable `(messages, images) -> str | Generation`,
where `messages` is an OpenAI-style chat (`processor.chat` format, one `{"type": "image"}`
item per entry of `images`). The CLI passes `backends.AnswerOnly` over the local engine or a
server; tests pass a fake. `--method text` never calls it. It may be called from several
threads at once (`run_pages(concurrency=N)`); the documents are only read in the caller's.

Per page, by method (`routing` classifies every page first, cheaply, with a reason):
- `text`: Markdown from the text layer (`textlayer`), never the model; a page with no text
  layer is not written and is named as needing the model.
- `auto`: pages routed to the text path take it; the others go to the model with their
  text-layer lines as anchors (`anchored`), or the image alone (`vision`) without a text layer.
  If the model cannot be loaded, pages with a text layer take the text path (said in the summary).
- `vision`: every page to the model, image only.
A blank page writes nothing (its record says `blank: true`); the model is never asked about it.
"""

from __future__ import annotations

import math
import signal
import time
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Literal, Protocol

from PIL import Image

from kimivl_cli.backends import Generation
from kimivl_cli.errors import InputError
from kimivl_cli.media import MediaInput, MediaKind, PdfDocument, load_images, parse_page_range
from kimivl_cli.tasks.ocr import textlayer
from kimivl_cli.tasks.ocr.output import PageKey, PageRecord, PageSink
from kimivl_cli.tasks.ocr.postprocess import EMPTY_PAGE_NOTE, clean_markdown
from kimivl_cli.tasks.ocr.prompts import anchor_text, ocr_messages
from kimivl_cli.tasks.ocr.routing import Route, route_image, route_page
from kimivl_cli.tasks.pool import ordered_map

if TYPE_CHECKING:
    from kimivl_cli.processor.image import ImageProcessorConfig

Method = Literal["auto", "vision", "text"]
BLANK_DPI = 24


class Generate(Protocol):
    def __call__(self, messages: list[dict], images: list[Image.Image]) -> str | Generation: ...


@dataclass
class OcrOptions:
    method: Method = "auto"
    pages: str | None = None  # page range for every PDF (1-based spec, e.g. "1-3,7")
    dpi: float | None = None
    max_side: int | None = None
    password: str | None = None
    keep_headers: bool = False
    prompt_file: Path | None = None  # the user's instruction instead of prompts/ocr*.md
    processor: ImageProcessorConfig | None = None  # None: the official config (loaded with the model path only)

    def processor_config(self) -> ImageProcessorConfig:
        from kimivl_cli.processor.image import ImageProcessorConfig  # torch: only when a page meets the model

        return self.processor or ImageProcessorConfig.official()

    def page_token_budget(self) -> int:
        """Image tokens a page may cost by default: the processor's limit after the 2x2 merge."""
        cfg = self.processor_config()
        kh, kw = cfg.merge_kernel_size
        return cfg.in_token_limit // (kh * kw)


@dataclass
class PageJob:
    """One page to do: a PDF page (`doc`, 0-based `index`) or one frame of an image."""

    file: str
    page: int  # 1-based, as written in the output
    doc: PdfDocument | None = None
    index: int = 0
    image: Image.Image | None = None
    _style: list[textlayer.DocumentStyle] = field(default_factory=list, repr=False)  # shared per document

    @property
    def key(self) -> PageKey:
        return self.file, self.page


def display_name(source: MediaInput) -> str:
    return "stdin" if source.path is None else source.name


def plan_pages(sources: Sequence[MediaInput], options: OcrOptions) -> list[PageJob]:
    """Every page to OCR, in input order. Opens all PDFs first, so bad inputs fail before any output."""
    jobs: list[PageJob] = []
    for source in sources:
        name = display_name(source)
        if source.kind is MediaKind.PDF:
            doc = PdfDocument(source, password=options.password)
            indices = parse_page_range(options.pages, doc.page_count) if options.pages else range(doc.page_count)
            style: list[textlayer.DocumentStyle] = []
            jobs += [PageJob(name, i + 1, doc=doc, index=i, _style=style) for i in indices]
        else:
            jobs += [PageJob(name, i + 1, image=im) for i, im in enumerate(load_images(source))]
    return jobs


def _style(job: PageJob) -> textlayer.DocumentStyle:
    if not job._style:
        job._style.append(textlayer.document_style(job.doc.page(0).parent))
    return job._style[0]


def render_page(job: PageJob, options: OcrOptions) -> Image.Image:
    """The page image the model sees: `--dpi`, `--max-side`, or sized to the page token budget."""
    from kimivl_cli.processor.image import resize_to_token_budget

    cfg, budget = options.processor_config(), options.page_token_budget()
    if job.image is not None:
        image = job.image
    elif options.dpi or options.max_side:
        return job.doc.render(job.index, dpi=options.dpi, max_side=options.max_side)
    else:
        rect = job.doc.page(job.index).rect
        unit = cfg.unit_hw[0] * cfg.unit_hw[1]
        dpi = 72 * math.sqrt(budget * unit / (rect.width * rect.height))
        image = job.doc.render(job.index, dpi=dpi)
    return resize_to_token_budget(image, budget, cfg)


@dataclass
class NeedsModel:
    """A page the model should have done and did not: `--method text`, or the model failed to load."""

    job: PageJob
    route: Route
    start: float


@dataclass
class RunSummary:
    """What `run_pages` did: pages written, pages the model should do (written from the text
    layer, or not written at all), pages cut at the token limit, and why the model was unavailable."""

    written: int = 0
    via_text: list[tuple[PageKey, str]] = field(default_factory=list)
    unwritten: list[tuple[PageKey, str]] = field(default_factory=list)
    truncated: list[PageKey] = field(default_factory=list)
    model_error: str | None = None

    def merge(self, other: RunSummary) -> None:
        """Add another run's summary (one per output file)."""
        self.written += other.written
        self.via_text += other.via_text
        self.unwritten += other.unwritten
        self.truncated += other.truncated
        self.model_error = self.model_error or other.model_error


@contextmanager
def terminate_as_interrupt():
    """SIGTERM handled like Ctrl-C while pages run (finished pages stay whole; the caller says so)."""

    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt("SIGTERM")

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@dataclass
class PreparedPage:
    """A page made ready in the calling thread (PyMuPDF is not thread-safe): either finished
    already (`record`), or waiting for the model with its `messages` and `image`."""

    job: PageJob
    start: float
    route: Route
    record: PageRecord | None = None
    messages: list[dict] = field(default_factory=list)
    image: Image.Image | None = None
    method: str = "vision"

    def finish(self, generate: Generate | None, options: OcrOptions, state: RunSummary) -> PageRecord | NeedsModel:
        """The record: the model's answer, cleaned (thread-safe: touches no document). Without a
        usable model (none given, or it failed to load in `auto`), a `NeedsModel` for the caller."""
        if self.record is not None:
            return self.record
        job, image = self.job, self.image
        if generate is None or state.model_error is not None:
            return NeedsModel(job, self.route, self.start)
        from kimivl_cli.processor.image import image_token_count

        try:
            answer = generate(self.messages, [image])
        except InputError as exc:
            if options.method != "auto":
                raise
            state.model_error = state.model_error or exc.message
            return NeedsModel(job, self.route, self.start)
        result = answer if isinstance(answer, Generation) else Generation(answer)
        tokens = result.prompt_tokens + result.completion_tokens
        tokens = tokens or image_token_count(image.width, image.height, options.processor_config())
        markdown = clean_markdown(result.text) or EMPTY_PAGE_NOTE
        return _record(job, markdown, self.method, self.route, self.start, tokens, result.finish_reason)


def _record(
    job: PageJob, markdown: str, method: str, route: Route, start: float, tokens: int = 0, finish: str | None = None
) -> PageRecord:
    return PageRecord(
        job.file,
        job.page,
        markdown,
        method,
        tokens,
        round(time.perf_counter() - start, 3),
        route=route.target,
        reason=route.reason,
        blank=route.target == "blank",
        finish_reason=finish,
    )


def _route(job: PageJob, words: list) -> Route:
    if job.doc is None:
        return route_image(job.image)
    thumbnail = None if words else job.doc.render(job.index, dpi=BLANK_DPI)
    return route_page(job.doc.page(job.index), words, thumbnail)


def text_markdown(job: PageJob, options: OcrOptions) -> str:
    """The page from its text layer (no model)."""
    return textlayer.page_markdown(job.doc.page(job.index), _style(job), keep_headers=options.keep_headers)


def prepare_page(job: PageJob, options: OcrOptions) -> PreparedPage:
    """Everything that reads the document: blank and text-path pages finish here, others are rendered."""
    start = time.perf_counter()
    words = job.doc.words(job.index) if job.doc is not None else []
    route = _route(job, words)
    if route.target == "blank":
        return PreparedPage(job, start, route, _record(job, "", "blank", route, start))
    if options.method == "text" or (options.method == "auto" and route.target == "text"):
        if not words:
            return PreparedPage(job, start, route)  # nothing to read without the model
        markdown = text_markdown(job, options) or EMPTY_PAGE_NOTE
        return PreparedPage(job, start, route, _record(job, markdown, "text", route, start))
    anchors = None
    if options.method == "auto" and words:
        rect = job.doc.page(job.index).rect
        anchors = anchor_text(words, rect.width, rect.height)
    messages = ocr_messages(anchors, options.prompt_file)
    return PreparedPage(
        job, start, route, None, messages, render_page(job, options), "anchored" if anchors else "vision"
    )


def run_pages(
    jobs: Sequence[PageJob],
    options: OcrOptions,
    sink: PageSink,
    generate: Generate | None = None,
    done: set[PageKey] | frozenset[PageKey] = frozenset(),
    on_page: Callable[[PageRecord], None] | None = None,
    concurrency: int = 1,
) -> RunSummary:
    """OCR the pages not in `done` and write each to `sink` in page order.

    With `concurrency` N, up to N pages wait on `generate` at once (pages are read and rendered
    here, one at a time, just ahead of need); a page is written as soon as it and all pages
    before it are finished. Pages in `done` are never prepared nor sent. A page the model should
    do but cannot is written from its text layer where it has one (`summary.via_text`), else
    left out (`summary.unwritten`).
    """
    summary = RunSummary()
    todo = (prepare_page(job, options) for job in jobs if job.key not in done)
    for outcome in ordered_map(lambda page: page.finish(generate, options, summary), todo, concurrency):
        record = outcome
        if isinstance(outcome, NeedsModel):
            job, route = outcome.job, outcome.route
            markdown = text_markdown(job, options) if job.doc is not None and job.doc.words(job.index) else ""
            if not markdown:
                summary.unwritten.append((job.key, route.reason))
                continue
            summary.via_text.append((job.key, route.reason))
            record = _record(job, markdown, "text", route, outcome.start)
        elif options.method == "text" and outcome.route == "model":
            summary.via_text.append((outcome.key, outcome.reason))
        if record.finish_reason == "length":
            summary.truncated.append(record.key)
        sink.write(record)
        summary.written += 1
        if on_page:
            on_page(record)
    return summary
