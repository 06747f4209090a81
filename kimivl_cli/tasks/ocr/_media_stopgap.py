"""STOPGAP until `kimivl_cli.media` lands: the subset of its announced API that OCR uses.

Same names and semantics as `media.inputs.resolve_inputs`, `media.pdf.PdfDocument`,
`media.pdf.parse_page_range` and `media.images.load_images`; delete this file and import
from `kimivl_cli.media` once it exists.
"""

from __future__ import annotations

import io
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, NamedTuple

import pymupdf
from PIL import Image, UnidentifiedImageError

from kimivl_cli.errors import InputError

_MAGIC = {
    b"%PDF": "pdf",
    b"\x89PNG": "image",
    b"\xff\xd8\xff": "image",
    b"GIF8": "image",
    b"II*\x00": "image",
    b"MM\x00*": "image",
    b"BM": "image",
    b"RIFF": "image",
}


@dataclass(frozen=True)
class MediaInput:
    name: str
    kind: str
    path: Path | None = None
    data: bytes | None = None

    def read_bytes(self) -> bytes:
        return self.data if self.data is not None else self.path.read_bytes()


def _kind(head: bytes, name: str) -> str:
    for magic, kind in _MAGIC.items():
        if head.startswith(magic):
            return kind
    raise InputError(f"{name}: not a PDF or an image this tool can read")


def resolve_inputs(args: list[str], stdin: BinaryIO | None = None) -> list[MediaInput]:
    found: list[MediaInput] = []
    for arg in args:
        if arg == "-":
            data = (stdin or sys.stdin.buffer).read()
            found.append(MediaInput("-", _kind(data[:8], "stdin"), data=data))
            continue
        path = Path(arg)
        if not path.exists():
            raise InputError(f"{arg}: no such file or folder")
        files = (
            sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith("."))
            if path.is_dir()
            else [path]
        )
        for f in files:
            with open(f, "rb") as fh:
                head = fh.read(8)
            try:
                found.append(MediaInput(str(f), _kind(head, str(f)), path=f))
            except InputError:
                if not path.is_dir():
                    raise
    if not found:
        raise InputError("no PDFs or images found in the inputs")
    return found


def load_images(source: MediaInput) -> list[Image.Image]:
    try:
        image = Image.open(io.BytesIO(source.read_bytes()))
        frames = []
        for i in range(getattr(image, "n_frames", 1)):
            image.seek(i)
            frames.append(image.convert("RGB"))
        return frames
    except (UnidentifiedImageError, OSError) as exc:
        raise InputError(f"{source.name}: cannot decode the image ({exc})") from None


class Word(NamedTuple):
    x0: float
    y0: float
    x1: float
    y1: float
    text: str
    block: int
    line: int
    word: int


class PdfDocument:
    def __init__(self, source: MediaInput, password: str | None = None) -> None:
        try:
            self.doc = pymupdf.open(stream=source.read_bytes(), filetype="pdf")
        except Exception:
            raise InputError(f"{source.name}: not a readable PDF (corrupt or truncated)") from None
        if self.doc.needs_pass and not (password and self.doc.authenticate(password)):
            raise InputError(f"{source.name} is encrypted", "pass the right --password")
        if self.doc.page_count == 0:
            raise InputError(f"{source.name} has no pages")
        self.page_count = self.doc.page_count

    def page(self, index: int) -> pymupdf.Page:
        return self.doc[index]

    def render(self, page: int, *, dpi: float | None = None, max_side: int | None = None) -> Image.Image:
        p = self.doc[page]
        zoom = (dpi or 144) / 72
        if max_side:
            zoom = max_side / max(p.rect.width, p.rect.height)
        pix = p.get_pixmap(matrix=pymupdf.Matrix(zoom, zoom), alpha=False)
        return Image.frombytes("RGB", (pix.width, pix.height), pix.samples)

    def words(self, page: int) -> list[Word]:
        return [Word(*w) for w in self.doc[page].get_text("words")]


def parse_page_range(spec: str, page_count: int) -> list[int]:
    pages: list[int] = []
    for part in spec.split(","):
        m = re.fullmatch(r"\s*(\d+)?\s*(-)?\s*(\d+)?\s*", part)
        if not m or not (m[1] or m[3]):
            raise InputError(f"bad page range {spec!r}", "use e.g. 1-3,7")
        lo = int(m[1] or 1)
        hi = int(m[3] or page_count) if m[2] else lo
        if not 1 <= lo <= hi <= page_count:
            raise InputError(f"page range {spec!r} is outside 1-{page_count}")
        pages.extend(range(lo - 1, hi))
    return pages
