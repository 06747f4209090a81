"""`kimivl ask`: inputs and a question -> one user turn (chat messages + images) that fits the context.

Each input becomes content items, in the order given:

- image: the image (every page of a TIFF);
- PDF: `name, page N:` then the page image, for each page (`--pages`); pages are fitted to the
  context by `tasks.documents` (smaller renders, or the most relevant pages);
- video: `[hh:mm:ss.s]` then the frame, for `--frames N` frames spread over it or one every
  1/`--fps` seconds (the timestamp is the decoder's own);
- text file: `name:` and its content, inlined;

then the question. Nothing here prints: notes for the user (which pages, why) come back in
`Prompt.notes` for the CLI to show.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Union

from PIL import Image

from kimivl_cli.errors import InputError
from kimivl_cli.media import MEDIA_KINDS, MediaInput, MediaKind, load_images, resolve_inputs
from kimivl_cli.tasks.documents import MIN_PAGE_TOKENS, page_list, plan_pages

if TYPE_CHECKING:
    from kimivl_cli.media.pdf import PdfDocument
    from kimivl_cli.processor.image import ImageProcessorConfig
    from kimivl_cli.processor.tokenizer import Tokenizer

ASK_KINDS = MEDIA_KINDS | {MediaKind.TEXT}
DEFAULT_FRAMES = 8
"""Frames sampled from a video when neither a frame count nor a rate is given."""
MAX_TEXT_BYTES = 4 << 20
"""A text input larger than this is refused: it could not fit any context anyway (~1M tokens)."""


@dataclass(frozen=True)
class MediaOptions:
    """How inputs are read: PDF pages and password, video sampling."""

    pages: str | None = None
    password: str | None = None
    frames: int | None = None
    fps: float | None = None

    def __post_init__(self) -> None:
        if self.frames is not None and self.fps is not None:
            raise InputError("`frames` and `fps` both choose the video frames", "give one of them")


@dataclass(frozen=True)
class PdfPage:
    """A PDF page not rendered yet: what it would cost at the default render, and its text layer."""

    doc: PdfDocument
    index: int
    cost: int
    text: str

    @property
    def label(self) -> str:
        return f"{Path(self.doc.name).name}, page {self.index + 1}:\n"


Segment = Union[str, Image.Image, PdfPage]


@dataclass
class Prompt:
    """One user turn ready for `Engine.generate`: messages (one image item per image) and the images."""

    messages: list[dict[str, Any]]
    images: list[Image.Image]
    notes: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Budget:
    """The context the prompt must fit: `limit` tokens, `reserve` of them kept for the reply."""

    limit: int
    reserve: int
    source: str = "the model's context"


# --- command-line arguments --------------------------------------------------------------------------


def split_question(args: Sequence[str], stdin_is_tty: bool, read_stdin: Callable[[], bytes]) -> tuple[list[str], str]:
    """(inputs, question) from `ask`'s arguments.

    The question is the last argument. When that names an existing path, every argument is an
    input and the question is read from stdin, which must then be a pipe not used as an input
    (`echo "What is it?" | kimivl ask a.png`).
    """
    if not args:
        raise InputError("no question given", 'usage: kimivl ask [INPUT...] "QUESTION"')
    if args[-1] == "-":
        raise InputError(
            "no question given: the last argument '-' reads an input from stdin",
            'put the question last, e.g. kimivl ask - "What is this?"',
        )
    if os.path.exists(args[-1]):
        if stdin_is_tty or "-" in args:
            raise InputError(
                f"no question given: the last argument {args[-1]} is a file",
                'put the question last: kimivl ask FILE "QUESTION"',
            )
        question = read_stdin().decode("utf-8", errors="replace").strip()
        if not question:
            raise InputError("no question given (stdin is empty)", 'put the question last: kimivl ask FILE "QUESTION"')
        return list(args), question
    question = args[-1].strip()
    if not question:
        raise InputError("the question is empty", 'usage: kimivl ask [INPUT...] "QUESTION"')
    return list(args[:-1]), question


# --- inputs -> segments -------------------------------------------------------------------------------


class Segments:
    """Reads inputs into segments; keeps PDFs open (pages render later, once sized). A context manager."""

    def __init__(self, options: MediaOptions, image_config: ImageProcessorConfig) -> None:
        self.options = options
        self.image_config = image_config
        self.notes: list[str] = []  # what was capped while reading, for the user
        self._stack = ExitStack()

    def __enter__(self) -> Segments:
        return self

    def __exit__(self, *exc: object) -> None:
        self._stack.close()

    def read(self, item: MediaInput) -> list[Segment]:
        if item.kind is MediaKind.IMAGE:
            return list(load_images(item))
        if item.kind is MediaKind.PDF:
            return list(self._pdf(item))
        if item.kind is MediaKind.VIDEO:
            return self._video(item)
        return [self._text(item)]

    def _pdf(self, item: MediaInput) -> Iterator[PdfPage]:
        from kimivl_cli.media.pdf import PdfDocument, parse_page_range
        from kimivl_cli.processor.image import image_token_count

        doc = self._stack.enter_context(PdfDocument(item, password=self.options.password))
        pages = parse_page_range(self.options.pages, doc.page_count) if self.options.pages else range(doc.page_count)
        for index in pages:
            cost = image_token_count(*doc.render_size(index), self.image_config)
            yield PdfPage(doc, index, cost, doc.text(index))

    def _video(self, item: MediaInput) -> list[Segment]:
        from kimivl_cli.media.video import DEFAULT_MAX_FRAMES, VideoFile

        with VideoFile(item) as video:
            if self.options.fps is not None:
                frames = video.sample(fps=self.options.fps)
                wanted, asked = math.ceil(video.duration * self.options.fps - 1e-9), f"`fps` {self.options.fps:g}"
            else:
                frames = video.sample(count=self.options.frames or DEFAULT_FRAMES)
                wanted, asked = self.options.frames or DEFAULT_FRAMES, f"`frames` {self.options.frames}"
            if len(frames) < wanted:
                why = (
                    f"it has only {video.frame_count}"
                    if len(frames) == video.frame_count
                    else f"at most {DEFAULT_MAX_FRAMES} are sampled from one video"
                )
                self.notes.append(f"{item.name}: {asked} asks for {wanted} frames, sending {len(frames)} ({why})")
        segments: list[Segment] = []
        for frame in frames:
            segments += [f"{frame.label}\n", frame.to_pil()]
        return segments

    @staticmethod
    def _text(item: MediaInput) -> str:
        if item.size > MAX_TEXT_BYTES:
            raise InputError(f"{item.name} is {item.size:,} bytes of text, too long to ask about", "pass an excerpt")
        content = item.read_bytes().decode("utf-8", errors="replace").strip()
        return f"{item.name}:\n{content}\n\n"


# --- segments -> a prompt that fits ------------------------------------------------------------------


def content_items(segments: Sequence[Segment], question: str) -> list[dict[str, Any]]:
    """A user turn's content: each segment's items (a PDF page: its label, then the image), then the question."""
    items: list[dict[str, Any]] = []
    for seg in segments:
        if isinstance(seg, str):
            items.append({"type": "text", "text": seg})
        elif isinstance(seg, PdfPage):
            items += [{"type": "text", "text": seg.label}, {"type": "image"}]
        else:
            items.append({"type": "image"})
    items.append({"type": "text", "text": question})
    return items


def _messages(content: list[dict[str, Any]], system: str | None) -> list[dict[str, Any]]:
    head = [{"role": "system", "content": system}] if system else []
    return [*head, {"role": "user", "content": content}]


def text_tokens(messages: Sequence[dict[str, Any]], tokenizer: Tokenizer) -> int:
    """Prompt tokens other than image tokens (the chat template, labels and question)."""
    from kimivl_cli.processor.chat import chat_images, encode_chat

    return len(encode_chat(messages, tokenizer, [0] * len(chat_images(messages))).input_ids)


def build_prompt(
    segments: Sequence[Segment],
    question: str,
    *,
    system: str | None,
    tokenizer: Tokenizer | None,
    image_config: ImageProcessorConfig,
    budget: Budget | None,
    min_page_tokens: int = MIN_PAGE_TOKENS,
) -> Prompt:
    """The user turn, with PDF pages sized or chosen so the whole prompt fits `budget`.

    Images and video frames go at their natural cost; PDF pages share what is left
    (`documents.plan_pages`). Pages are rendered here, only the ones sent, each once.
    Without a tokenizer or a budget (a remote server counts its own tokens) every page is sent
    at the default render.
    """
    from kimivl_cli.processor.image import image_token_count

    pages = [s for s in segments if isinstance(s, PdfPage)]
    notes: list[str] = []
    keep: set[int] = {id(p) for p in pages}
    cap = None
    if pages and tokenizer is not None and budget is not None:
        fixed = sum(image_token_count(s.width, s.height, image_config) for s in segments if isinstance(s, Image.Image))
        others = [s for s in segments if not isinstance(s, PdfPage)]
        used = text_tokens(_messages(content_items(others, question), system), tokenizer) + fixed + budget.reserve
        room = budget.limit - used
        costs = [p.cost for p in pages]
        labels = [len(tokenizer.encode(p.label, allow_special=False)) for p in pages]
        plan = plan_pages(costs, [p.text for p in pages], question, max(room, 0), min_page_tokens, labels)
        if not plan.keep:
            raise InputError(
                f"no room for any PDF page: {budget.source} is {budget.limit:,} tokens and the text, other images "
                f"and the reply need {used:,}",
                "raise `max_context`, lower `max_tokens`, or drop other inputs",
            )
        keep = {id(pages[i]) for i in plan.keep}
        cap = plan.cap
        notes += _plan_notes(pages, plan.keep, plan.cap, plan.ranked, plan.matched, sum(costs), room, budget)
    kept = [s for s in segments if not isinstance(s, PdfPage) or id(s) in keep]
    images = [
        s if isinstance(s, Image.Image) else _render(s, cap, image_config) for s in kept if not isinstance(s, str)
    ]
    return Prompt(_messages(content_items(kept, question), system), images, notes)


def _render(page: PdfPage, cap: int | None, cfg: ImageProcessorConfig) -> Image.Image:
    """The page at the default resolution, or rendered straight at the size its token cap allows."""
    from kimivl_cli.media.pdf import DEFAULT_DPI
    from kimivl_cli.processor.image import resize_to_token_budget

    if cap is None or cap >= page.cost:
        return page.doc.render(page.index)
    width, height = page.doc.page_size(page.index)
    unit = cfg.unit_hw[0] * cfg.unit_hw[1]
    dpi = min(DEFAULT_DPI, 72 * math.sqrt(cap * unit / max(width * height, 1.0)))
    return resize_to_token_budget(page.doc.render(page.index, dpi=dpi), cap, cfg)


def _plan_notes(
    pages: Sequence[PdfPage],
    keep: Sequence[int],
    cap: int | None,
    ranked: bool,
    matched: bool,
    total: int,
    room: int,
    budget: Budget,
) -> list[str]:
    if cap is None and not ranked:
        return []
    why = f"{len(pages)} PDF pages need {total:,} image tokens; {max(room, 0):,} are left in {budget.source}"
    size = f"at most {cap:,} tokens per page" if cap is not None else "at full size"
    if not ranked:
        return [f"{why}: every page is sent smaller, {size}"]
    by_doc: dict[str, list[int]] = {}
    for i in keep:
        by_doc.setdefault(pages[i].doc.name, []).append(pages[i].index + 1)
    chosen = "; ".join(
        f"{name} page{'s' if len(numbers) > 1 else ''} {page_list(numbers)}" for name, numbers in by_doc.items()
    )
    how = (
        "whose text best matches the question (BM25 over the text layer)"
        if matched
        else "first in order (no page's text matches the question)"
    )
    return [
        f"{why}: sending {len(keep)} of {len(pages)} pages, {how}, {size}: {chosen}",
        "choose pages yourself with `pages`, or raise `max_context`",
    ]


def resolve(args: Sequence[str], skipped: list[str] | None = None) -> list[MediaInput]:
    """The inputs named in `args` ('-' = stdin): images, PDFs, videos and text files; files in
    folders that are none of these are added to `skipped`."""
    return resolve_inputs(list(args), kinds=ASK_KINDS, skipped=skipped)


def folder_note(args: Sequence[str], items: Sequence[MediaInput], skipped: Sequence[str]) -> str | None:
    """What was sent from folders and what was skipped, when an argument is a folder."""
    folders = [arg for arg in args if arg != "-" and os.path.isdir(arg)]
    if not folders:
        return None
    inside = [item.name for item in items if any(_under(item.name, folder) for folder in folders)]
    sent = f"sending {len(inside)} file{'s' if len(inside) != 1 else ''} from {', '.join(folders)}: {_names(inside)}"
    if not skipped:
        return sent
    return f"{sent}; skipped {len(skipped)} (not an image, PDF, video or text file): {_names(skipped)}"


def _under(name: str, folder: str) -> bool:
    return os.path.commonpath([os.path.abspath(name), os.path.abspath(folder)]) == os.path.abspath(folder)


def _names(paths: Sequence[str], shown: int = 10) -> str:
    more = f" and {len(paths) - shown} more" if len(paths) > shown else ""
    return ", ".join(paths[:shown]) + more


@contextmanager
def read_inputs(
    items: Sequence[MediaInput], options: MediaOptions, image_config: ImageProcessorConfig
) -> Iterator[tuple[list[Segment], list[str]]]:
    """The segments of every input, in order, and notes on what was capped; PDFs stay open while
    the block runs (pages render late)."""
    with Segments(options, image_config) as reader:
        yield [seg for item in items for seg in reader.read(item)], reader.notes
