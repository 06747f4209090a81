"""Where finished pages go: Markdown or JSONL, appended one whole page at a time.

Each page is one `os.write` of its full record on an O_APPEND descriptor followed by `fsync`,
with SIGINT and SIGTERM held back for that moment, so an interrupt never leaves a page half
written (a failed write cuts its own bytes back). The file is created with the first page
(mode 0666 less the umask), so a run that writes nothing leaves nothing behind.

- JSONL: one JSON object per line (`PageRecord`'s fields).
- Markdown: every page opens with `<!-- page: "FILE" N crc32=XXXXXXXX -->` (the name as a JSON
  string with `>` escaped, ` truncated` added for a page cut at the token limit), then a blank
  line, the page, a blank line. A line of the page that starts like a page comment gets one
  more leading backslash (removed on reading), so no page text can forge a separator.

`--resume` (`read_pages`) appends only to a file it recognises as its own: every JSONL line a
page record (a cut-off last record after at least one whole one is dropped: kimivl wrote it),
a Markdown file that starts with a page comment. It never removes anything else: a page edited
by hand stays as it is and counts as done. `--redo-truncated` replaces, in place, the pages cut
at the token limit that nobody edited.
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
from kimivl_cli.guards import check_output

Format = Literal["markdown", "jsonl"]
PageKey = tuple[str, int]

_SEPARATOR = re.compile(
    r'^<!-- page: (?P<name>"(?:[^"\\\n]|\\.)*") (?P<page>\d+) crc32=(?P<crc>[0-9a-f]{8})(?P<cut> truncated)? -->$',
    re.MULTILINE,
)
_LOOKS_LIKE_SEPARATOR = re.compile(r"^(\\*)(<!-- page: )", re.MULTILINE)
_ESCAPED_SEPARATOR = re.compile(r"^\\(\\*<!-- page: )", re.MULTILINE)
_RECORD_START = b'{"file": '


@dataclass(frozen=True)
class PageRecord:
    """One finished page. `method`: text, anchored, vision or blank; `route`/`reason`: where the
    router sent it and why; `finish_reason`: the model's ('length': cut at the token limit)."""

    file: str
    page: int  # 1-based
    markdown: str
    method: str
    tokens: int
    seconds: float
    route: str = "text"
    reason: str = ""
    blank: bool = False
    finish_reason: str | None = None

    @property
    def key(self) -> PageKey:
        return self.file, self.page


@dataclass(frozen=True)
class StoredPage:
    """A page as found in an output file: its bytes `start:end`, unchanged since written or not."""

    file: str
    page: int
    markdown: str
    start: int
    end: int
    intact: bool
    truncated: bool

    @property
    def key(self) -> PageKey:
        return self.file, self.page


def separator(file: str, page: int, body: str, truncated: bool = False) -> str:
    """The comment that opens a page in Markdown output."""
    name = json.dumps(file, ensure_ascii=False).replace(">", "\\u003e")
    flag = " truncated" if truncated else ""
    return f"<!-- page: {name} {page} crc32={zlib.crc32(body.encode()):08x}{flag} -->\n"


def format_record(record: PageRecord, fmt: Format) -> str:
    if fmt == "jsonl":
        return json.dumps(asdict(record), ensure_ascii=False) + "\n"
    escaped = _LOOKS_LIKE_SEPARATOR.sub(r"\\\1\2", record.markdown)
    body = f"\n{escaped}\n\n" if record.markdown else "\n"
    return separator(record.file, record.page, body, record.finish_reason == "length") + body


def read_pages(data: bytes, fmt: Format, path: Path | str = "OUT") -> tuple[list[StoredPage], int]:
    """The pages in an output file's bytes and where kimivl's own bytes end (a cut-off last JSONL
    record is not counted); an InputError if the file is not kimivl output."""
    return (_read_jsonl if fmt == "jsonl" else _read_markdown)(data, str(path))


def _not_ours(path: str, why: str) -> InputError:
    return InputError(f"{path} is not kimivl OCR output ({why})", "pick another output file, or `force` to replace it")


def _read_jsonl(data: bytes, path: str) -> tuple[list[StoredPage], int]:
    pages: list[StoredPage] = []
    offset = 0
    for number, line in enumerate(data.splitlines(keepends=True), 1):
        record = _page_record(line)
        if record is None:
            last = offset + len(line) == len(data) and not line.endswith(b"\n")
            if last and pages and line.startswith(_RECORD_START):
                return pages, offset  # our own record, cut off by a crash
            raise _not_ours(path, f"line {number} is not a page record")
        end = offset + len(line)
        truncated = record.get("finish_reason") == "length"
        pages.append(StoredPage(record["file"], record["page"], record["markdown"], offset, end, True, truncated))
        offset = end
    return pages, len(data)


def _page_record(line: bytes) -> dict | None:
    try:
        record = json.loads(line)
    except (ValueError, RecursionError):
        return None
    fields = {"file": str, "page": int, "markdown": str, "method": str}
    if not isinstance(record, dict) or not all(isinstance(record.get(k), t) for k, t in fields.items()):
        return None
    return record


def _read_markdown(data: bytes, path: str) -> tuple[list[StoredPage], int]:
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise _not_ours(path, "not UTF-8 text") from None
    matches = list(_SEPARATOR.finditer(text))
    if text and (not matches or matches[0].start() != 0):
        raise _not_ours(path, "it does not start with a kimivl page comment")
    pages = []
    for i, match in enumerate(matches):
        end = matches[i + 1].start() if i + 1 < len(matches) else len(text)
        body = text[match.end() + 1 : end]  # after the comment's newline
        intact = f"{zlib.crc32(body.encode()):08x}" == match["crc"]
        markdown = body[1:] if body.startswith("\n") else body
        markdown = markdown[:-2] if markdown.endswith("\n\n") else markdown
        markdown = _ESCAPED_SEPARATOR.sub(r"\1", markdown)
        start_byte, end_byte = len(text[: match.start()].encode()), len(text[:end].encode())
        name = json.loads(match["name"])
        pages.append(StoredPage(name, int(match["page"]), markdown, start_byte, end_byte, intact, bool(match["cut"])))
    return pages, len(data)


class PageSink(Protocol):
    def write(self, record: PageRecord) -> None: ...
    def close(self) -> None: ...


@contextmanager
def _signals_deferred():
    """Hold SIGINT and SIGTERM until the block ends: a page is written whole, then the signal lands."""
    if not hasattr(signal, "pthread_sigmask"):
        yield
        return
    old = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


class StreamSink:
    """Pages to a text stream (stdout), flushed per page so pipelines see them as they finish."""

    def __init__(self, stream: IO[str], fmt: Format) -> None:
        self.stream, self.fmt = stream, fmt

    def write(self, record: PageRecord) -> None:
        with _signals_deferred():
            self.stream.write(format_record(record, self.fmt))
            self.stream.flush()

    def close(self) -> None:
        pass


class FileSink:
    """Pages appended durably to a file (created with the first page): one write + fsync per page.

    `redo` maps pages to replace (unedited truncated ones) to nothing: their new record takes
    their place in the file instead of being appended.
    """

    def __init__(self, path: Path, fmt: Format, *, redo: set[PageKey] = frozenset(), newline: bool = False) -> None:
        self.path, self.fmt, self.redo = path, fmt, set(redo)
        self.fd: int | None = None
        self._pending = b"\n" if newline else b""  # the file ended mid-line: start the next page on a new one

    def write(self, record: PageRecord) -> None:
        data = format_record(record, self.fmt).encode()
        with _signals_deferred():
            if record.key in self.redo:
                self._replace(record.key, data)
                self.redo.discard(record.key)
                return
            if self.fd is None:
                self.fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
            _append(self.fd, self._pending + data)
            self._pending = b""

    def _replace(self, key: PageKey, data: bytes) -> None:
        """The stored page `key` replaced by `data`: a new file renamed over the old one."""
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None
        old = self.path.read_bytes()
        page = next(p for p in read_pages(old, self.fmt, self.path)[0] if p.key == key)
        tmp = self.path.with_name(f".{self.path.name}.kimivl-tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666)
        try:
            _append(fd, old[: page.start] + data + old[page.end :])
            os.fchmod(fd, self.path.stat().st_mode & 0o7777)
        finally:
            os.close(fd)
        os.replace(tmp, self.path)

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


def _append(fd: int, data: bytes) -> None:
    """Write all of `data` and fsync; on a failed write (disk full), cut back what this call wrote."""
    size = os.fstat(fd).st_size
    try:
        while data:  # a regular file takes it in one go; loop only for a short write
            data = data[os.write(fd, data) :]
        os.fsync(fd)
    except OSError as exc:
        os.ftruncate(fd, size)
        raise InputError(
            f"cannot write the output ({exc.strerror or exc})", "free some disk space, then `resume`"
        ) from None


def open_sink(
    out: Path | None, fmt: Format, *, force: bool, resume: bool, redo_truncated: bool = False
) -> tuple[PageSink, set[PageKey]]:
    """The sink for OUT (stdout when None) and the pages it already holds (with `resume`).

    An existing OUT is continued only with `resume` (and only if it is kimivl's own output) or
    replaced with `force`. With `redo_truncated`, its unedited truncated pages are not counted
    as done and their new versions replace them.
    """
    if out is None:
        if resume:
            raise InputError("`resume` needs an output file", "add `output` OUT")
        return StreamSink(sys.stdout, fmt), set()
    if out.is_dir():
        raise InputError(
            f"output {out} is a folder", "give a file name with -o, or end it with / for one file per input"
        )
    check_output(out)  # a device or FIFO is never unlinked, truncated or read (`/dev/null` as the output, forced)
    if not out.exists():
        if not out.parent.exists():
            raise InputError(f"folder {out.parent} does not exist", "create it first")
        return FileSink(out, fmt), set()
    if not resume:
        if not force:
            raise InputError(f"{out} already exists", "use `force` to overwrite it or `resume` to continue it")
        out.unlink()
        return FileSink(out, fmt), set()
    if not out.is_file():
        raise InputError(f"{out} is not a regular file", "give a file to write to")
    data = out.read_bytes()
    pages, end = read_pages(data, fmt, out)
    if end < len(data):
        with open(out, "r+b") as f:  # the cut-off record read_pages recognised as ours
            f.truncate(end)
            os.fsync(f.fileno())
    redo = {p.key for p in pages if p.truncated and p.intact} if redo_truncated else set()
    newline = end > 0 and not data[:end].endswith(b"\n")
    return FileSink(out, fmt, redo=redo, newline=newline), {p.key for p in pages} - redo
