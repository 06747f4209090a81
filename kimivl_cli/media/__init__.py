"""The input layer, first in the one-way flow: files, folders and stdin -> images, PDF pages and
video frames. It imports no other layer; `processor`, the shot detector (`video`), `tasks` and
`cli` read their inputs through it.

Everything a user can pass goes through here, and every problem with it (missing, unreadable,
truncated, encrypted, too large, wrong type) is raised as `kimivl_cli.errors.InputError` naming
the file. Types are recognised by content, never by extension.

API (stable; the tasks build on it)::

    from kimivl_cli.media import sniff, MediaKind, resolve_inputs, MediaInput, load_images
    from kimivl_cli.media import PdfDocument, parse_page_range, VideoFile, Frame

    sniff(data: bytes) -> MediaKind                  # IMAGE, PDF, VIDEO, TEXT, UNKNOWN (a str Enum)
    resolve_inputs(args, stdin=None, *, kinds=MEDIA_KINDS) -> list[MediaInput]
        # '-' = stdin, or a named pipe/device: read once, in memory (at most 256 MiB); a folder =
        # its supported files, recursive, hidden ones and FIFOs/devices skipped (FIFOs never
        # opened, a note each), natural order of relative paths (page2 before page10)
    MediaInput(name, kind, path=None, data=None)     # .read_bytes(), .open(), .size, .describe()

    load_images(source, *, max_pixels=DEFAULT_MAX_PIXELS, max_total=MAX_INPUT_PIXELS, max_pages=None,
                background=None) -> list[PIL.Image.Image]
        # 8-bit RGB; every page of a TIFF (the first `max_pages`), first frame of a GIF/WebP; EXIF
        # orientation applied; alpha dropped like the official processor unless `background=(r, g, b)`
        # composites; every page's size checked from its header before the first is decoded

    PdfDocument(source, password=None)               # context manager; .page_count, .repaired
        .render(page, *, dpi=None, max_side=None) -> PIL RGB   # DEFAULT_DPI if neither
        .render_size(page, *, dpi=None, max_side=None) -> (w, h)   # without rendering
        .words(page) -> list[Word]                    # x0 y0 x1 y1 text block line word size (points)
        .text(page) -> str;  .images(page) -> list[PdfImage];  .page(page) -> pymupdf.Page
    parse_page_range("1-3,7,10-", page_count) -> [0, 1, 2, 6, 9, ...]   # 1-based in, 0-based out

    VideoFile(source)                                 # context manager; .fps .frame_count .duration .width .height
                                                      # .declared_frames (the header's count, None if absent)
        .sample(*, count=None, fps=None, max_frames=DEFAULT_MAX_FRAMES) -> list[Frame]
        .read(indices, max_side=None) -> list[Frame]  # exactly these frames, in order (shrunk as decoded)
        .stream(max_side, stride=1, workers=None) -> Iterator[Frame]   # every stride-th frame, in order,
                                                      # shrunk; chunks decoded in parallel, same frames as one decoder
        .check_end()                                  # InputError if the last frame does not decode
    Frame(index, timestamp, image)                    # timestamp: seconds from the decoder; image: RGB ndarray

`source` is a `MediaInput`, a path or the file's bytes; pages are 0-based everywhere.
`PdfDocument`/`parse_page_range` (PyMuPDF, slow to import: docs/performance.md) and `VideoFile`/`Frame`
(OpenCV) load on first use, so commands that touch neither start fast.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from kimivl_cli.media.images import DEFAULT_MAX_PIXELS, MAX_INPUT_PIXELS, load_images
from kimivl_cli.media.inputs import MEDIA_KINDS, MediaInput, Source, as_input, resolve_inputs
from kimivl_cli.media.sniff import SNIFF_BYTES, MediaKind, sniff

if TYPE_CHECKING:
    from kimivl_cli.media.pdf import DEFAULT_DPI, PdfDocument, PdfImage, Word, parse_page_range
    from kimivl_cli.media.video import DEFAULT_MAX_FRAMES, Frame, VideoFile

_LAZY = {
    "DEFAULT_DPI": "pdf",
    "PdfDocument": "pdf",
    "PdfImage": "pdf",
    "Word": "pdf",
    "parse_page_range": "pdf",
    "DEFAULT_MAX_FRAMES": "video",
    "Frame": "video",
    "VideoFile": "video",
}

__all__ = [
    "DEFAULT_DPI",
    "DEFAULT_MAX_FRAMES",
    "DEFAULT_MAX_PIXELS",
    "MAX_INPUT_PIXELS",
    "MEDIA_KINDS",
    "SNIFF_BYTES",
    "Frame",
    "MediaInput",
    "MediaKind",
    "PdfDocument",
    "PdfImage",
    "Source",
    "VideoFile",
    "Word",
    "as_input",
    "load_images",
    "parse_page_range",
    "resolve_inputs",
    "sniff",
]


def __getattr__(name: str) -> object:
    if name in _LAZY:
        return getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
