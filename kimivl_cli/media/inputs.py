"""Command-line arguments -> the media they name.

`resolve_inputs` turns `FILE...` into `MediaInput`s: `-` is stdin (read once, kept in memory),
a folder is every supported file below it in natural order, and each file's kind comes from its
bytes (`sniff`). Nothing is decoded here; the loaders in `images`, `pdf` and `video` do that.
"""

from __future__ import annotations

import io
import os
import re
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Union

from kimivl_cli.errors import InputError, notes
from kimivl_cli.guards import MAX_STREAM_BYTES, is_regular, read_stream
from kimivl_cli.media.sniff import SNIFF_BYTES, MediaKind, sniff

MEDIA_KINDS = frozenset({MediaKind.IMAGE, MediaKind.PDF, MediaKind.VIDEO})
"""What `resolve_inputs` accepts unless told otherwise; pass `kinds=` to also take TEXT."""

_KIND_NAMES = {MediaKind.IMAGE: "an image", MediaKind.PDF: "a PDF", MediaKind.VIDEO: "a video", MediaKind.TEXT: "text"}


@dataclass(frozen=True)
class MediaInput:
    """One input file: on disk (`path`) or in memory (`data`, e.g. stdin). `name` is for messages."""

    name: str
    kind: MediaKind
    path: Path | None = None
    data: bytes | None = None

    def __post_init__(self) -> None:
        if (self.path is None) == (self.data is None):
            raise ValueError("a MediaInput has either a path or data")

    def read_bytes(self) -> bytes:
        """The whole file. Prefer `open()` for large files: images and PDFs decode from a stream."""
        if self.data is not None:
            return self.data
        with self.open() as fh:
            return fh.read()

    def open(self) -> BinaryIO:
        """A binary stream over the file's bytes (the caller closes it)."""
        if self.data is not None:
            return io.BytesIO(self.data)
        assert self.path is not None
        try:
            return open(self.path, "rb")
        except OSError as exc:
            raise InputError(f"{self.name}: cannot read ({exc.strerror or exc})") from None

    @property
    def size(self) -> int:
        """Size in bytes."""
        if self.data is not None:
            return len(self.data)
        assert self.path is not None
        return self.path.stat().st_size

    def describe(self) -> str:
        """'an image', 'a PDF', ... for messages such as 'x.jpg is text, not an image'."""
        return _KIND_NAMES.get(self.kind, "of an unknown type")


Source = Union[MediaInput, str, os.PathLike, bytes]
"""What the loaders accept: a resolved input, a path, or the file's bytes."""


def as_input(source: Source) -> MediaInput:
    """A `MediaInput` for any `Source`, sniffed; its kind is not checked (missing or empty paths are errors)."""
    if isinstance(source, MediaInput):
        return source
    if isinstance(source, (bytes, bytearray, memoryview)):
        data = bytes(source)
        return MediaInput("<bytes>", sniff(data[:SNIFF_BYTES]), data=data)
    path = Path(source)
    if path.exists() and not is_regular(path) and not path.is_dir():
        return _read_special(path, str(path))
    return MediaInput(str(path), _sniff_file(path, str(path)), path=path)


def resolve_inputs(
    args: list[str],
    stdin: BinaryIO | None = None,
    *,
    kinds: Iterable[MediaKind] = MEDIA_KINDS,
    skipped: list[str] | None = None,
) -> list[MediaInput]:
    """The inputs named on the command line, in order, each file once.

    - `-` reads all of `stdin` (default: the process's) into memory; only once per call.
    - A folder expands recursively to its files of an accepted kind, hidden files and folders
      skipped, in natural order of their relative paths (`page2.png` before `page10.png`), so
      a folder of scans comes out in page order on every machine. Other files in it are skipped
      (and their paths added to `skipped` when given).
    - A named file (or stdin) of a kind not in `kinds` is an error, as is a missing path, an
      unreadable file, or a folder with nothing usable in it.
    """
    accepted = frozenset(kinds)
    found: list[MediaInput] = []
    stdin_used = False
    for arg in args:
        if arg == "-":
            if stdin_used:
                raise InputError("'-' (stdin) is given twice", "stdin can be read only once")
            stdin_used = True
            if stdin is None and sys.stdin.isatty():
                raise InputError("'-' reads stdin, but stdin is a terminal", "pipe a file in: kimivl ... - < photo.jpg")
            data = read_stream(stdin if stdin is not None else sys.stdin.buffer, "stdin")
            item = MediaInput("<stdin>", sniff(data[:SNIFF_BYTES]), data=data)
            if not data:
                raise InputError("stdin is empty", "pipe a file in, e.g. `cat photo.jpg | kimivl ask - ...`")
            found.append(_accept(item, accepted))
            continue
        path = Path(arg)
        if path.is_dir():
            found.extend(_expand_folder(path, accepted, skipped if skipped is not None else []))
        elif is_regular(path):
            found.append(_accept(MediaInput(arg, _sniff_file(path, arg), path=path), accepted))
        elif path.exists():  # a pipe or device named on purpose (`<(cmd)`, /dev/stdin): read once, like stdin
            found.append(_accept(_read_special(path, arg), accepted))
        else:
            raise InputError(f"{arg}: no such file or folder")
    return found


def _read_special(path: Path, name: str) -> MediaInput:
    """A pipe or device: its first bytes say what it is (`/dev/zero` is refused there), then the
    rest is read, bounded."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(SNIFF_BYTES)
            if head and sniff(head) is MediaKind.UNKNOWN:
                raise InputError(f"{name}: not a file type kimivl reads", "files are recognised by content")
            data = head + read_stream(fh, name, MAX_STREAM_BYTES - len(head))
    except OSError as exc:
        raise InputError(f"{name}: cannot read ({exc.strerror or exc})") from None
    if not data:
        raise InputError(f"{name} is empty (0 bytes)")
    return MediaInput(name, sniff(data[:SNIFF_BYTES]), data=data)


def _sniff_file(path: Path, name: str) -> MediaKind:
    try:
        with open(path, "rb") as fh:
            head = fh.read(SNIFF_BYTES)
    except IsADirectoryError:
        raise InputError(f"{name} is a folder, not a file") from None
    except FileNotFoundError:
        raise InputError(f"{name}: no such file or folder") from None
    except OSError as exc:
        raise InputError(f"{name}: cannot read ({exc.strerror or exc})") from None
    if not head:
        raise InputError(f"{name} is empty (0 bytes)")
    return sniff(head)


def _accept(item: MediaInput, accepted: frozenset[MediaKind]) -> MediaInput:
    if item.kind in accepted:
        return item
    wanted = _wanted(accepted)
    if item.kind is MediaKind.UNKNOWN:
        raise InputError(f"{item.name}: not a file type kimivl reads", f"expected {wanted}, recognised by content")
    raise InputError(f"{item.name} is {item.describe()}, not {wanted}", "files are recognised by content, not name")


def _wanted(accepted: frozenset[MediaKind]) -> str:
    names = [_KIND_NAMES[k] for k in MediaKind if k in accepted]
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " or " + names[-1]


def _natural_key(relative: Path) -> tuple:
    return tuple(
        tuple(int(chunk) if chunk.isdigit() else chunk.casefold() for chunk in re.split(r"(\d+)", part))
        for part in relative.parts
    )


def _expand_folder(root: Path, accepted: frozenset[MediaKind], skipped: list[str]) -> list[MediaInput]:
    files: list[Path] = []
    for folder, subfolders, names in os.walk(root, onerror=None):  # symlinked folders are not followed
        subfolders[:] = [d for d in subfolders if not d.startswith(".")]
        files.extend(Path(folder, n) for n in names if not n.startswith("."))
    files.sort(key=lambda p: (_natural_key(p.relative_to(root)), str(p)))
    found = []
    for path in files:
        if not is_regular(path):  # opening a FIFO would wait for a writer forever; never open one
            notes.warning("skipped %s: not a regular file (a FIFO, socket, device or broken link)", path)
            continue
        try:
            item = MediaInput(str(path), _sniff_file(path, str(path)), path=path)
        except InputError:
            skipped.append(str(path))  # empty or unreadable files are skipped like any unsupported file
            continue
        if item.kind in accepted:
            found.append(item)
        else:
            skipped.append(str(path))
    if not found:
        raise InputError(f"{root}: no supported files in this folder", f"expected {_wanted(accepted)}")
    return found
