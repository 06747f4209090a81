"""Video files (OpenCV's FFmpeg backend): properties, frames at chosen positions, every frame in order.

The one video decoder: `VideoFile.read`/`sample` give chosen frames (`ask`, keyframes of
video-scenes), `VideoFile.stream` every frame in order, downscaled (the shot detector).

Every `Frame` carries the decoder's own position (`CAP_PROP_POS_MSEC` after the grab, i.e. the
frame's presentation time) rather than `index / fps`, so timestamps stay true on variable frame
rate files. Reading N sparse frames: `grab()` walks forward without converting or copying the
skipped frames (they are still decoded: H.264 needs them); gaps longer than `SEEK_GAP` frames
seek instead, which jumps to the nearest keyframe before the target and decodes from there.
Which is faster depends on the keyframe interval, so the rule is a fixed, deterministic one
(docs/performance.md has the measurements); both ways give bit-identical frames and timestamps
(tested).

`stream` with several workers: one FFmpeg decoder keeps about one core busy on small frames
however many threads it is given, so the video is cut into chunks of consecutive frames that
separate decoders read at the same time, while the caller takes the frames in order:

    chunk 0  [0, L)     decoder 1 --+
    chunk 1  [L, 2L)    decoder 2 --+--> frames 0, 1, 2, ... --> caller
    chunk 2  [2L, 3L)   decoder 1 --+    (chunk 2 starts once chunk 0 is consumed)

A decoder seeks to its chunk by frame number (FFmpeg decodes forward from the key frame before
it). That can land on the wrong frame in odd files (variable frame rate, broken timestamps), so
each chunk also decodes the frame just before it, which must equal the previous chunk's last frame
in pixels and timestamp. On a mismatch the stream drops the plan and decodes the rest of the video
sequentially: the output is always exactly what one sequential decoder gives. Memory: at most
`workers` chunks of downscaled frames (`CHUNK_FRAMES` x 96 x 54 x 3 bytes = 16 MB per chunk at the
detector's size) plus one decoded full-size frame per decoder, whatever the length.

Importing this module silences OpenCV's and FFmpeg's logging on stderr (unless `KIMIVL_DEBUG=1`
or the user set `OPENCV_LOG_LEVEL` / `OPENCV_FFMPEG_LOGLEVEL`): they would print lines like
"moov atom not found" beside our one-line error, which already says what is wrong.
"""

from __future__ import annotations

import functools
import itertools
import math
import os
import tempfile
import threading
from collections import deque
from collections.abc import Generator, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from queue import Empty, Queue
from typing import TypeVar

import cv2
import numpy as np
from PIL import Image

from kimivl_cli.errors import InputError
from kimivl_cli.media.images import check_budget, check_pixels
from kimivl_cli.media.inputs import Source, as_input
from kimivl_cli.media.sniff import MediaKind

if os.environ.get("KIMIVL_DEBUG") != "1":
    os.environ.setdefault("OPENCV_FFMPEG_LOGLEVEL", "-8")  # FFmpeg reads it when the first capture opens
    if "OPENCV_LOG_LEVEL" not in os.environ:
        cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_SILENT)

DEFAULT_MAX_FRAMES = 64
"""Cap on sampled frames: each frame costs as many vision tokens as an image of its size."""

SEEK_GAP = 250
"""Walk with grab() over gaps up to this many frames, seek beyond. x264's default keyframe
interval is 250, so a longer jump usually lands after a keyframe and decodes less."""


MAX_FPS = 1000.0
"""Rates from here up are not a video's own: FFmpeg reports the container's time base (1000 for
Matroska's milliseconds) when a stream carries no frame rate."""

SINGLE_THREAD_DECODE_PIXELS = 500_000
"""`stream`: frames up to this size decode faster on one FFmpeg thread per decoder than with
FFmpeg's frame threading; larger ones use its threads (docs/performance.md)."""

CHUNK_FRAMES = 1024
"""`stream`'s longest chunk: bounds the frames buffered per decoder, and keeps the frames a seek
decodes for nothing (back to the previous key frame) a small share of the chunk."""

MIN_CHUNK_FRAMES = 64
"""Shorter chunks cost more in opening and seeking than reading them in parallel saves."""

MAX_WORKERS = 4
"""`stream`'s default decoders: one per core, at most this many."""

T = TypeVar("T")


def open_capture(path: str | Path, name: str, decode_threads: int = 0) -> tuple[cv2.VideoCapture, float]:
    """(capture, frames per second) for `path`: the one place a video is opened, so every command
    refuses the same files in the same words. `decode_threads` 0 lets FFmpeg choose.

    Refused: files FFmpeg cannot open, frames over the pixel cap (from the header, before one is
    decoded), and streams with no frame rate: frame times and scene times would be guesses."""
    cap = cv2.VideoCapture(str(path), cv2.CAP_FFMPEG, [cv2.CAP_PROP_N_THREADS, decode_threads])
    try:
        if not cap.isOpened():
            raise InputError(f"{name}: not a readable video", "is it truncated, or in a codec FFmpeg lacks?")
        width, height = int(cap.get(cv2.CAP_PROP_FRAME_WIDTH)), int(cap.get(cv2.CAP_PROP_FRAME_HEIGHT))
        if width > 0 and height > 0:
            check_pixels(name, width, height)
        fps = float(cap.get(cv2.CAP_PROP_FPS))
        if not (math.isfinite(fps) and 0 < fps < MAX_FPS):
            raise InputError(
                f"{name}: the video reports no frame rate", "re-encode it with one, e.g. ffmpeg -i IN -r 25 OUT.mp4"
            )
    except BaseException:
        cap.release()
        raise
    return cap, fps


def frame_time(seconds: float) -> str:
    """HH:MM:SS.d, the time the model reads for a frame (`ask` and video-scenes alike): floored
    to the tenth, so a frame never reads later than it is (59.97 s is 00:00:59.9, not 00:01:00.0)."""
    tenths = max(0, math.floor(seconds * 10 + 1e-6))  # 1e-6: 0.3 s is 2.9999... tenths in binary
    hours, rest = divmod(tenths, 36000)
    minutes, rest = divmod(rest, 600)
    return f"{hours:02d}:{minutes:02d}:{rest // 10:02d}.{rest % 10}"


def frame_label(seconds: float) -> str:
    """The marker put in the text just before a frame: `[00:01:23.4]`."""
    return f"[{frame_time(seconds)}]"


@dataclass(frozen=True)
class Frame:
    """A decoded frame: its index in the stream, its presentation time, its pixels (H x W x 3 RGB uint8)."""

    index: int
    timestamp: float  # seconds, from the decoder
    image: np.ndarray

    @property
    def label(self) -> str:
        return frame_label(self.timestamp)

    def to_pil(self) -> Image.Image:
        return Image.fromarray(self.image)


class VideoFile:
    """An open video. Use as a context manager, or call `close()`.

    `frame_count`, `fps` and `duration` are the container's figures (for streams without a
    frame count, frames are counted once, when first asked); `declared_frames` is the header's
    count, None when it gives none. In-memory inputs (stdin) are spooled to a temporary file,
    since FFmpeg reads from a path; it is deleted on `close()`.
    """

    def __init__(self, source: Source) -> None:
        item = as_input(source)
        self.name = item.name
        if item.kind is not MediaKind.VIDEO:
            raise InputError(f"{item.name} is {item.describe()}, not a video")
        self._spool: Path | None = None
        if item.path is not None:
            self.path = item.path
        else:
            with tempfile.NamedTemporaryFile(prefix="kimivl-", suffix=".video", delete=False) as fh:
                fh.write(item.read_bytes())
            self.path = self._spool = Path(fh.name)
        self._streams: list[Generator] = []
        try:
            self._cap, self.fps = self._open()
            self.width = int(self._cap.get(cv2.CAP_PROP_FRAME_WIDTH))
            self.height = int(self._cap.get(cv2.CAP_PROP_FRAME_HEIGHT))
            count = int(self._cap.get(cv2.CAP_PROP_FRAME_COUNT))
            if not self._cap.grab():
                raise InputError(f"{self.name}: no decodable frames", "is the file truncated or the codec unsupported?")
            self._next = 1  # index of the frame the next grab() returns
            if self.width <= 0 or self.height <= 0:
                raise InputError(f"{self.name}: the video reports no frame size")
            self.declared_frames = count if count > 0 else None
        except BaseException:
            self.close()
            raise

    @functools.cached_property
    def frame_count(self) -> int:
        """Frames in the video: the header's count, else counted by decoding the whole file once."""
        return self.declared_frames or self._count_frames()

    @property
    def duration(self) -> float:
        """Seconds, from the frame count and rate."""
        return self.frame_count / self.fps

    def __enter__(self) -> VideoFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Stop the decoders of unfinished `stream`s, release the capture, delete the spooled copy."""
        for stream in self._streams:
            stream.close()
        if getattr(self, "_cap", None) is not None:
            self._cap.release()
        if self._spool is not None:
            self._spool.unlink(missing_ok=True)
            self._spool = None

    def sample(
        self, *, count: int | None = None, fps: float | None = None, max_frames: int = DEFAULT_MAX_FRAMES
    ) -> list[Frame]:
        """Frames spread over the whole video: `count` of them (the middle frame of each of
        `count` equal segments), or one every 1/`fps` seconds from the start. Never more than
        `max_frames` (nor than the video has): an `fps` asking for more becomes `max_frames`
        uniform samples. Cost: decodes up to the last sampled frame (see the module docstring)."""
        if (count is None) == (fps is None):
            raise ValueError("give exactly one of count and fps")
        if (count is not None and count < 1) or (fps is not None and not 0 < fps < math.inf) or max_frames < 1:
            raise InputError("the number of frames and the sampling rate must be positive and finite")
        n = self.frame_count
        if fps is not None:
            step = self.fps / fps  # source frames per sample
            wanted = math.ceil(n / step - 1e-9)
            if wanted <= max_frames:
                return self.read([min(n - 1, math.floor(k * step + 0.5)) for k in range(wanted)])  # nearest, ties up
            count = max_frames
        assert count is not None
        count = min(count, max_frames, n)
        return self.read([int((k + 0.5) * n / count) for k in range(count)])

    def check_end(self) -> None:
        """InputError unless the last frame decodes: catches files cut short whose header
        still promises every frame. Cost: one seek, i.e. decoding from the last keyframe."""
        self.read([self.frame_count - 1])

    def _open(self) -> tuple[cv2.VideoCapture, float]:
        return open_capture(self.path, self.name)

    def _count_frames(self) -> int:
        cap, count = self._open()[0], 0
        while cap.grab():
            count += 1
        cap.release()
        return count

    def read(self, indices: list[int], max_side: int | None = None) -> list[Frame]:
        """The frames at `indices` (each once, in stream order), walking short gaps and seeking
        long ones (`SEEK_GAP`); each downscaled to `max_side` as it is decoded when given. InputError
        if one of them cannot be decoded, or if together they exceed `MAX_INPUT_PIXELS` (checked
        before decoding)."""
        targets = sorted(set(indices))
        width, height = _fitted(self.width, self.height, max_side)
        check_budget(self.name, [(width, height)] * len(targets), unit="frames", hint="sample fewer frames")
        frames = []
        for target in targets:
            gap = target - self._next
            if gap < 0 or gap > SEEK_GAP:
                seek(self._cap, target)
            else:
                for _ in range(gap):
                    if not self._cap.grab():
                        break
            if not self._cap.grab():
                raise InputError(
                    f"{self.name}: frame {target} of {self.frame_count} cannot be decoded", "is the file truncated?"
                )
            index = round(self._cap.get(cv2.CAP_PROP_POS_FRAMES)) - 1
            self._next = index + 1
            frames.append(self._frame(self._cap, index, max_side))
        return frames

    def _frame(self, cap: cv2.VideoCapture, index: int, max_side: int | None) -> Frame:
        timestamp = cap.get(cv2.CAP_PROP_POS_MSEC) / 1000.0
        ok, bgr = cap.retrieve()
        if not ok or bgr is None:
            raise InputError(f"{self.name}: frame {index} cannot be decoded", "is the file truncated?")
        height, width = bgr.shape[:2]  # rotated phone videos come out turned; a frame may not outgrow the header
        if width * height > self.width * self.height:
            raise InputError(f"{self.name}: frame {index} is {width}x{height}, larger than the video's header says")
        if (size := _fitted(width, height, max_side)) != (width, height):
            bgr = cv2.resize(bgr, size, interpolation=cv2.INTER_AREA)
        return Frame(index, timestamp, cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB))

    def stream(self, max_side: int, stride: int = 1, workers: int | None = None) -> Iterator[Frame]:
        """Every stride-th frame in order, shrunk to fit `max_side` as it is decoded, with the
        decoder's timestamps; it ends where decoding stops (a truncated file ends early).

        `workers` decoders read chunks in parallel (default one per core, at most `MAX_WORKERS`);
        the frames are exactly those one decoder gives. `close()` stops unfinished streams."""
        workers = workers if workers is not None else min(MAX_WORKERS, available_cores())
        chunks = plan_chunks(self.declared_frames or 0, stride, workers)
        if len(chunks) > 1:
            stream = self._parallel(chunks, max_side, stride, workers)
        else:
            stream = self._sequential(max_side, stride)
        self._streams.append(stream)
        return stream

    def _stream_capture(self, share: int) -> cv2.VideoCapture:
        """A new capture for one of `stream`'s decoders: one FFmpeg thread for small frames,
        else `share` (0: FFmpeg chooses)."""
        small = self.width * self.height <= SINGLE_THREAD_DECODE_PIXELS
        return open_capture(self.path, self.name, 1 if small else share)[0]

    def _sequential(self, max_side: int, stride: int, skip: int = 0) -> Iterator[Frame]:
        """One decoder (FFmpeg's threading for large frames), from frame `skip` on."""
        cap = self._stream_capture(share=0)
        try:
            for _ in range(skip):
                if not cap.grab():
                    return
            for item in prefetch(_decode(cap, max_side, stride, first=skip)):
                if item.small is not None:
                    yield item.frame()
        finally:
            cap.release()

    def _decode_chunk(
        self, chunk: _Chunk, out: Queue, stop: threading.Event, max_side: int, stride: int, workers: int
    ) -> None:
        """A pool thread: the chunk's frames (from the one before it) into `out`, then `_CHUNK_END`
        or the exception that stopped it; returns early once `stop` is set."""
        try:
            cap = self._stream_capture(share=max(1, available_cores() // workers))
            try:
                first = max(0, chunk.start - 1)  # from the frame before the chunk: it checks the seek
                if first:
                    seek(cap, first)
                edges = (first, -1 if chunk.stop is None else chunk.stop - 1)
                for item in _decode(cap, max_side, stride, first, chunk.stop, edges):
                    if stop.is_set():
                        return
                    out.put(item)
            finally:
                cap.release()
            out.put(_CHUNK_END)
        except BaseException as exc:  # handed to the consumer, raised there
            out.put(exc)

    def _parallel(self, chunks: list[_Chunk], max_side: int, stride: int, workers: int) -> Iterator[Frame]:
        stop = threading.Event()
        upcoming = iter(chunks)
        pending: deque[tuple[_Chunk, Queue]] = deque()

        def submit_next() -> None:
            chunk = next(upcoming, None)
            if chunk is not None:
                pending.append((chunk, Queue()))
                pool.submit(self._decode_chunk, *pending[-1], stop, max_side, stride, workers)

        with ThreadPoolExecutor(workers, thread_name_prefix="kimivl-decode") as pool:
            try:
                for _ in range(workers):
                    submit_next()
                previous: _Decoded | None = None  # the last frame decoded so far
                while pending:
                    chunk, out = pending.popleft()
                    items = _chunk_items(out)
                    if chunk.start > 0:
                        seam = next(items, None)
                        if previous is None or seam is None or not _same_frame(seam, previous):
                            stop.set()  # the seek missed: one decoder from here, as if never split
                            yield from self._sequential(max_side, stride, skip=chunk.start)
                            return
                    for item in items:
                        if item.small is not None and item.index % stride == 0:
                            yield item.frame()
                        previous = item
                    if chunk.stop is not None and (previous is None or previous.index + 1 < chunk.stop):
                        return  # the video ends early (a truncated file), where one decoder stops too
                    submit_next()
            finally:
                stop.set()
                pool.shutdown(wait=False, cancel_futures=True)  # leaving `with` waits for running chunks


def seek(cap: cv2.VideoCapture, frame: int) -> None:
    """Position `cap` so the next grab() decodes `frame` (FFmpeg starts from the key frame before it)."""
    cap.set(cv2.CAP_PROP_POS_FRAMES, frame)


def shrink(frame: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Bilinear to twice `size`, then 2x2 box averaging: faster than INTER_AREA alone at odd
    ratios (docs/performance.md), alias-free enough for analysis."""
    w, h = size
    if frame.shape[1] <= 2 * w:
        return cv2.resize(frame, size, interpolation=cv2.INTER_AREA)
    double = cv2.resize(frame, (2 * w, 2 * h), interpolation=cv2.INTER_LINEAR)
    return cv2.resize(double, size, interpolation=cv2.INTER_AREA)


@dataclass(frozen=True)
class _Decoded:
    index: int
    small: np.ndarray | None  # the frame shrunk to the stream's size, RGB (None: only decoded)
    msec: float  # its timestamp as FFmpeg reports it (NaN when only decoded)

    def frame(self) -> Frame:
        """The `Frame` callers see (only for items with pixels)."""
        return Frame(self.index, self.msec / 1000.0, self.small)


def _decode(
    cap: cv2.VideoCapture, max_side: int, stride: int, first: int = 0, stop: int | None = None, edges: tuple = ()
) -> Iterator[_Decoded]:
    """Frames first..stop-1 of an open capture positioned at `first`, one item per decoded frame:
    every stride-th frame and the `edges` converted and shrunk, the others only decoded (the codec
    needs them)."""
    size: tuple[int, int] | None = None
    full: np.ndarray | None = None  # reused: a full-size frame is converted into it each time
    index = first
    while (stop is None or index < stop) and cap.grab():
        small = None
        if index % stride == 0 or index in edges:
            ok, full = cap.retrieve(full)
            if ok and full is not None:
                if size is None:
                    size = _fitted(full.shape[1], full.shape[0], max_side)
                small = cv2.cvtColor(shrink(full, size), cv2.COLOR_BGR2RGB)
        yield _Decoded(index, small, cap.get(cv2.CAP_PROP_POS_MSEC) if small is not None else math.nan)
        index += 1


def prefetch(items: Iterator[T], depth: int = 16) -> Iterator[T]:
    """Run `items` in a thread, `depth` ahead: decoding (which releases the GIL) overlaps the consumer.

    The queue is bounded, so memory stays constant; an exception in the thread is re-raised here.
    """
    queue: Queue = Queue(maxsize=depth)
    done = object()
    stop = threading.Event()

    def produce() -> None:
        try:
            for item in items:
                if stop.is_set():
                    return
                queue.put(item)
            queue.put(done)
        except BaseException as exc:  # handed to the consumer, raised there
            queue.put(exc)

    thread = threading.Thread(target=produce, name="kimivl-decode", daemon=True)
    thread.start()
    try:
        while (item := queue.get()) is not done:
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        while thread.is_alive():  # unblock a producer waiting on a full queue
            try:
                queue.get_nowait()
            except Empty:
                thread.join(0.01)


def available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


@dataclass(frozen=True)
class _Chunk:
    start: int
    stop: int | None  # None: to the end of the video


def plan_chunks(count: int, stride: int, workers: int) -> list[_Chunk]:
    """Consecutive chunks covering the video (the last one open-ended, the header count may be off);
    a single chunk when the count is unknown (0), one decoder is asked for, or the video is short."""
    length = math.ceil(min(CHUNK_FRAMES, math.ceil(max(count, 0) / max(workers, 1))) / stride) * stride
    if count <= 0 or workers < 2 or length < MIN_CHUNK_FRAMES:
        return [_Chunk(0, None)]
    starts = list(range(0, count, length))
    return [_Chunk(a, b) for a, b in itertools.pairwise(starts)] + [_Chunk(starts[-1], None)]


_CHUNK_END = object()


def _chunk_items(out: Queue) -> Iterator[_Decoded]:
    """A chunk's frames as its thread puts them in `out`; its exception is raised here."""
    while (item := out.get()) is not _CHUNK_END:
        if isinstance(item, BaseException):
            raise item
        yield item


def _same_frame(a: _Decoded, b: _Decoded) -> bool:
    """Same position, timestamp and pixels: the check that a seek landed where it was asked to."""
    return (
        a.index == b.index
        and a.msec == b.msec
        and a.small is not None
        and b.small is not None
        and np.array_equal(a.small, b.small)
    )


def _fitted(width: int, height: int, max_side: int | None) -> tuple[int, int]:
    """(width, height) scaled down to fit `max_side`, aspect kept (PIL's `thumbnail` rounding)."""
    if max_side is None or max(width, height) <= max_side:
        return width, height
    scale = max_side / max(width, height)
    return max(1, round(width * scale)), max(1, round(height * scale))
