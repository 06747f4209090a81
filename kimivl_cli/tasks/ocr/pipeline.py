"""Page planning and the page loop of `kimivl ocr`.

The model is a seam: `Generate` is any callable `(messages, images) -> str | Generation`,
where `messages` is an OpenAI-style chat (`processor.chat` format, one `{"type": "image"}`
item per entry of `images`). The CLI passes `backends.AnswerOnly` over the local engine or a
server; tests pass a fake. `--method text` never calls it. It may be called from several
threads at once (`run_pages(concurrency=N)`); the documents are only read in the caller's.

Per page, by method:
- `text`: Markdown from the text layer; pages without one fall back to the model (`vision`).
- `auto`: the page image plus its text-layer lines as anchors (`anchored`); no text layer: `vision`.
- `vision`: the page image only.
A page that renders near-uniform at 24 dpi and has no text layer is recorded as `blank`, model unused.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Literal, Protocol

import numpy as np
from PIL import Image

from kimivl_cli.backends import Generation
from kimivl_cli.errors import InputError
from kimivl_cli.media import MediaInput, MediaKind, PdfDocument, load_images, parse_page_range
from kimivl_cli.tasks.ocr import textlayer
from kimivl_cli.tasks.ocr.output import PageKey, PageRecord, PageSink
from kimivl_cli.tasks.ocr.postprocess import EMPTY_PAGE_NOTE, clean_markdown
from kimivl_cli.tasks.ocr.prompts import anchor_text, ocr_messages
from kimivl_cli.tasks.pool import ordered_map

if TYPE_CHECKING:
    from kimivl_cli.processor.image import ImageProcessorConfig

Method = Literal["auto", "vision", "text"]
BLANK_NOTE = "<!-- blank page: skipped -->"
BLANK_DPI = 24
BLANK_STD = 4.0  # grey-level standard deviation (0-255) below which a page is uniform
BLANK_INK = 0.002  # share of pixels clearly darker than the background


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


def is_blank(image: Image.Image) -> bool:
    """Near-uniform: tiny grey spread, or almost no pixels darker than the background. O(pixels)."""
    grey = np.asarray(image.convert("L"), dtype=np.float32)
    if grey.std() < BLANK_STD:
        return True
    background = float(np.median(grey))
    return float((grey < background - 60).mean()) < BLANK_INK


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
class PreparedPage:
    """A page made ready in the calling thread (PyMuPDF is not thread-safe): either finished
    already (`record`) or waiting for the model with its `messages` and `image`."""

    job: PageJob
    start: float
    record: PageRecord | None = None
    messages: list[dict] = field(default_factory=list)
    image: Image.Image | None = None
    method: str = "vision"

    def finish(self, generate: Generate | None, options: OcrOptions) -> PageRecord:
        """The record: the model's answer, cleaned (thread-safe: touches no document)."""
        if self.record is not None:
            return self.record
        job, image = self.job, self.image
        if generate is None:
            raise InputError(
                f"{job.file} page {job.page} has no text layer and needs the model", "load a model or use a text PDF"
            )
        from kimivl_cli.processor.image import image_token_count

        answer = generate(self.messages, [image])
        result = answer if isinstance(answer, Generation) else Generation(answer)
        tokens = result.prompt_tokens + result.completion_tokens
        tokens = tokens or image_token_count(image.width, image.height, options.processor_config())
        markdown = clean_markdown(result.text) or EMPTY_PAGE_NOTE
        return PageRecord(job.file, job.page, markdown, self.method, tokens, _since(self.start))


def _since(start: float) -> float:
    return round(time.perf_counter() - start, 3)


def prepare_page(job: PageJob, options: OcrOptions) -> PreparedPage:
    """Everything that reads the document: blank and text-layer pages finish here, others are rendered."""
    start = time.perf_counter()
    words = job.doc.words(job.index) if job.doc is not None else []
    method = options.method
    if not words:
        thumbnail = job.image if job.image is not None else job.doc.render(job.index, dpi=BLANK_DPI)
        if is_blank(thumbnail):
            return PreparedPage(job, start, PageRecord(job.file, job.page, BLANK_NOTE, "blank", 0, _since(start)))
        method = "vision"
    elif method == "text":
        markdown = textlayer.page_markdown(job.doc.page(job.index), _style(job), keep_headers=options.keep_headers)
        return PreparedPage(
            job, start, PageRecord(job.file, job.page, markdown or EMPTY_PAGE_NOTE, "text", 0, _since(start))
        )
    anchors = None
    if method == "auto":
        rect = job.doc.page(job.index).rect
        anchors = anchor_text(words, rect.width, rect.height)
    messages = ocr_messages(anchors, options.prompt_file)
    return PreparedPage(job, start, None, messages, render_page(job, options), "anchored" if anchors else "vision")


def ocr_page(job: PageJob, options: OcrOptions, generate: Generate | None) -> PageRecord:
    """One page to a record; the model runs only when the method and the page need it."""
    return prepare_page(job, options).finish(generate, options)


def run_pages(
    jobs: Sequence[PageJob],
    options: OcrOptions,
    sink: PageSink,
    generate: Generate | None = None,
    done: set[PageKey] | frozenset[PageKey] = frozenset(),
    on_page: Callable[[PageRecord], None] | None = None,
    concurrency: int = 1,
) -> int:
    """OCR the pages not in `done` and write each to `sink` in page order; returns the count.

    With `concurrency` N, up to N pages wait on `generate` at once (pages are read and rendered
    here, one at a time, just ahead of need); a page is written as soon as it and all pages
    before it are finished. Pages in `done` are never prepared nor sent.
    """
    todo = (prepare_page(job, options) for job in jobs if job.key not in done)
    count = 0
    for record in ordered_map(lambda page: page.finish(generate, options), todo, concurrency):
        sink.write(record)
        count += 1
        if on_page:
            on_page(record)
    return count
