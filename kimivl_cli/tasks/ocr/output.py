"""Where finished pages go: Markdown or JSONL, appended one whole page at a time.

Each page is one `os.write` of its full record on an O_APPEND descriptor followed by
`fsync`, with SIGINT held back for that moment, so Ctrl-C or a crash never leaves a page
half written except on power loss or a full disk, and that case is caught on `--resume`:

- JSONL: one JSON object per line; a last line without its newline or not valid JSON is cut off.
- Markdown: every page starts with `<!-- page: FILE N crc32=XXXXXXXX -->`, the CRC of the page's
  body, so a cut-off last page is recognised and cut off too.

`--resume` reads the (file, page) pairs already present and the runner skips them.
"""

from __future__ import annotations

import json
import os
import re
import signal
import sys
import zlib
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import IO, Literal, Protocol

from kimivl_cli.errors import InputError

Format = Literal["markdown", "jsonl"]
PageKey = tuple[str, int]

_SEPARATOR = re.compile(r"^<!-- page: (?P<file>.*) (?P<page>\d+) crc32=(?P<crc>[0-9a-f]{8}) -->\n", re.MULTILINE)


@dataclass(frozen=True)
class PageRecord:
    """One finished page. `method`: text, vision, anchored or blank (skipped); `page` is 1-based."""

    file: str
    page: int
    markdown: str
    method: str
    tokens: int
    seconds: float

    @property
    def key(self) -> PageKey:
        return self.file, self.page


def separator(file: str, page: int, body: str) -> str:
    """The comment that opens a page in Markdown output (newlines in names would break parsing)."""
    name = file.replace("\n", " ").replace("-->", "-- >")
    return f"<!-- page: {name} {page} crc32={zlib.crc32(body.encode()):08x} -->\n"


def format_record(record: PageRecord, fmt: Format) -> str:
    if fmt == "jsonl":
        return json.dumps(asdict(record), ensure_ascii=False) + "\n"
    body = f"\n{record.markdown.strip()}\n\n"
    return separator(record.file, record.page, body) + body


class PageSink(Protocol):
    def write(self, record: PageRecord) -> None: ...
    def close(self) -> None: ...


@contextmanager
def _sigint_deferred():
    """Hold SIGINT until the block ends: a page is written whole, then the interrupt lands."""
    if not hasattr(signal, "pthread_sigmask"):
        yield
        return
    old = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


class StreamSink:
    """Pages to a text stream (stdout), flushed per page so pipelines see them as they finish."""

    def __init__(self, stream: IO[str], fmt: Format) -> None:
        self.stream, self.fmt = stream, fmt

    def write(self, record: PageRecord) -> None:
        with _sigint_deferred():
            self.stream.write(format_record(record, self.fmt))
            self.stream.flush()

    def close(self) -> None:
        pass


class FileSink:
    """Pages appended durably to a file: one write + fsync per page."""

    def __init__(self, path: Path, fmt: Format) -> None:
        self.fmt = fmt
        self.fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

    def write(self, record: PageRecord) -> None:
        data = format_record(record, self.fmt).encode()
        with _sigint_deferred():
            while data:  # a regular file takes it in one go; loop only for a short write
                data = data[os.write(self.fd, data) :]
            os.fsync(self.fd)

    def close(self) -> None:
        os.close(self.fd)


def open_sink(out: Path | None, fmt: Format, *, force: bool, resume: bool) -> tuple[PageSink, set[PageKey]]:
    """The sink for OUT (stdout when None) and the pages it already holds (with `resume`).

    An existing OUT is kept only with `resume` (its cut-off last page removed) or replaced with `force`.
    """
    if out is None:
        if resume:
            raise InputError("--resume needs an output file", "add -o OUT")
        return StreamSink(sys.stdout, fmt), set()
    if out.is_dir():
        raise InputError(f"output {out} is a folder", "give a file name with -o")
    done: set[PageKey] = set()
    if out.exists():
        if resume:
            done = truncate_to_complete(out, fmt)
        elif force:
            out.unlink()
        else:
            raise InputError(f"{out} already exists", "use --force to overwrite it or --resume to continue it")
    elif not out.parent.exists():
        raise InputError(f"folder {out.parent} does not exist", "create it first")
    return FileSink(out, fmt), done


def truncate_to_complete(path: Path, fmt: Format) -> set[PageKey]:
    """The pages fully present in `path`, after cutting off a trailing partial page (in place)."""
    data = path.read_bytes()
    keys, good = (_complete_jsonl if fmt == "jsonl" else _complete_markdown)(data, path)
    if good < len(data):
        with open(path, "r+b") as f:
            f.truncate(good)
            f.flush()
            os.fsync(f.fileno())
    return keys


def _complete_jsonl(data: bytes, path: Path) -> tuple[set[PageKey], int]:
    keys: set[PageKey] = set()
    good = 0
    lines = data.split(b"\n")[:-1]  # what follows the last newline is empty or cut off
    for i, line in enumerate(lines):
        try:
            record = json.loads(line)
            keys.add((str(record["file"]), int(record["page"])))
        except (ValueError, KeyError, TypeError):
            if i == len(lines) - 1:  # a damaged last record: redo that page
                break
            raise InputError(
                f"{path} line {i + 1} is not a kimivl OCR record", "pick another output file or use --force"
            ) from None
        good += len(line) + 1
    return keys, good


def _complete_markdown(data: bytes, path: Path) -> tuple[set[PageKey], int]:
    text = data.decode("utf-8", errors="replace")
    matches = list(_SEPARATOR.finditer(text))
    if text.strip() and (not matches or matches[0].start() != 0):
        raise InputError(f"{path} does not start with a kimivl page comment", "pick another output file or use --force")
    keys: set[PageKey] = set()
    good = 0
    for i, match in enumerate(matches):
        end = matches[i + 1].start() if i + 1 < len(matches) else len(text)
        body = text[match.end() : end]
        if i + 1 == len(matches) and f"{zlib.crc32(body.encode()):08x}" != match["crc"]:
            break  # the last page was cut off by a crash (earlier pages may have been edited by hand: fine)
        keys.add((match["file"], int(match["page"])))
        good = len(text[:end].encode())
    return keys, good
