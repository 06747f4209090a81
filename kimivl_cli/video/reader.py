"""Reading a video for the shot detector: every frame in order, downscaled, as fast as the codec allows.

Decoding is most of the cost of shot detection (the detector itself needs ~0.1 ms a frame at
96 px), and one FFmpeg decoder keeps about one core busy on small frames however many threads it
is given. So on a machine with several cores the video is cut into chunks of consecutive frames
that separate decoders read at the same time, while the detector takes the frames in order:

    chunk 0  [0, L)     decoder 1 --+
    chunk 1  [L, 2L)    decoder 2 --+--> frames 0, 1, 2, ... --> detector
    chunk 2  [2L, 3L)   decoder 1 --+    (chunk 2 starts once chunk 0 is consumed)

A decoder seeks to its chunk by frame number (FFmpeg decodes forward from the key frame before
it). That can land on the wrong frame in odd files (variable frame rate, broken timestamps), so
each chunk also decodes the frame just before it, which must equal the previous chunk's last frame
in pixels and timestamp. On a mismatch the reader drops the plan and decodes the rest of the video
sequentially: the output is always exactly what one sequential decoder gives.

Memory: at most `workers` chunks of downscaled frames (L x the analysis frame, 1024 x 96 x 54 x 3
bytes = 16 MB at most per chunk) plus one decoded full-size frame per decoder, whatever the length.
"""

from __future__ import annotations

import itertools
import math
import os
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

from kimivl_cli.errors import InputError
from kimivl_cli.media.inputs import as_input
from kimivl_cli.media.sniff import MediaKind
from kimivl_cli.media.video import open_capture

T = TypeVar("T")

SINGLE_THREAD_DECODE_PIXELS = 500_000
"""Frames up to this size decode faster on one FFmpeg thread per decoder than with FFmpeg's frame
threading. Measured with detection running on 2 cores, one thread vs two: 320x180 MJPEG 1.35x,
640x272 H.264 1.1x, 854x480 MPEG-4 1.3x faster; at 1280x720 threading wins (1.5x)."""

CHUNK_FRAMES = 1024
"""Longest chunk: bounds the frames buffered per decoder, and keeps the frames a seek decodes for
nothing (back to the previous key frame) a small share of the chunk."""

MIN_CHUNK_FRAMES = 64
"""Shorter chunks cost more in opening and seeking than reading them in parallel saves."""

MAX_WORKERS = 4


def open_video(path: str | Path, decode_threads: int = 0) -> tuple[cv2.VideoCapture, float, int]:
    """Open a video for streaming: (capture, fps, frame count from the header, -1 when unknown).

    Missing, empty and non-video files are refused by media's content sniffing, unreadable ones
    and those without a frame rate by `media.video.open_capture` (the same messages as every
    command); a file that opens but yields no frame gives no frames.
    """
    item = as_input(path)
    if item.kind is not MediaKind.VIDEO:
        raise InputError(f"{item.name} is {item.describe()}, not a video", "files are recognised by content, not name")
    cap, fps = open_capture(path, item.name, decode_threads)
    count = int(cap.get(cv2.CAP_PROP_FRAME_COUNT))
    return cap, fps, count if count > 0 else -1


def shrink(frame: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Bilinear to twice `size`, then 2x2 box averaging: 15x faster than INTER_AREA at odd ratios, alias-free enough."""
    w, h = size
    if frame.shape[1] <= 2 * w:
        return cv2.resize(frame, size, interpolation=cv2.INTER_AREA)
    double = cv2.resize(frame, (2 * w, 2 * h), interpolation=cv2.INTER_LINEAR)
    return cv2.resize(double, size, interpolation=cv2.INTER_AREA)


@dataclass(frozen=True)
class _Decoded:
    index: int
    small: np.ndarray | None  # the frame downscaled to the analysis size (None: only decoded)
    msec: float  # its timestamp as FFmpeg reports it (NaN when only decoded)


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
                    h, w = full.shape[:2]
                    scale = min(1.0, max_side / max(h, w))
                    size = (max(1, round(w * scale)), max(1, round(h * scale)))
                small = shrink(full, size)
        yield _Decoded(index, small, cap.get(cv2.CAP_PROP_POS_MSEC) if small is not None else math.nan)
        index += 1


def seek(cap: cv2.VideoCapture, frame: int) -> None:
    """Position `cap` so the next grab() decodes `frame` (FFmpeg starts from the key frame before it)."""
    cap.set(cv2.CAP_PROP_POS_FRAMES, frame)


def prefetch(items: Iterator[T], depth: int = 16) -> Iterator[T]:
    """Run `items` in a thread, `depth` ahead: decoding (which releases the GIL) overlaps detection.

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
    a single chunk when the count is unknown, one decoder is asked for, or the video is short."""
    length = math.ceil(min(CHUNK_FRAMES, math.ceil(max(count, 0) / max(workers, 1))) / stride) * stride
    if count <= 0 or workers < 2 or length < MIN_CHUNK_FRAMES:
        return [_Chunk(0, None)]
    starts = list(range(0, count, length))
    return [_Chunk(a, b) for a, b in itertools.pairwise(starts)] + [_Chunk(starts[-1], None)]


class FrameReader:
    """A video opened for one pass of `frames()`; `fps` and `count` (header, -1 unknown) are known at once.

    `workers` decoders read chunks in parallel (default: one per core, at most MAX_WORKERS).
    """

    def __init__(self, path: str | Path, workers: int | None = None) -> None:
        self.path = path
        self.workers = workers if workers is not None else min(MAX_WORKERS, available_cores())
        self.cap, self.fps, self.count = open_video(path, decode_threads=1)
        pixels = self.cap.get(cv2.CAP_PROP_FRAME_WIDTH) * self.cap.get(cv2.CAP_PROP_FRAME_HEIGHT)
        self.small_frames = pixels <= SINGLE_THREAD_DECODE_PIXELS
        self._streams: list[Generator] = []

    def __enter__(self) -> FrameReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Stop the decoder threads of unfinished `frames()` streams, then release the capture they read."""
        for stream in self._streams:
            stream.close()
        self.cap.release()

    def frames(self, max_side: int, stride: int = 1) -> Iterator[tuple[int, np.ndarray]]:
        """(frame number, frame downscaled to `max_side`) for every stride-th frame, in order."""
        chunks = plan_chunks(self.count, stride, self.workers)
        parallel = len(chunks) > 1
        stream = self._parallel(chunks, max_side, stride) if parallel else self._sequential(max_side, stride)
        self._streams.append(stream)
        return stream

    def _capture(self, threads_if_large: int, start: int) -> cv2.VideoCapture:
        """A capture for reading from frame `start`: the one already open (positioned at frame 0,
        one decode thread) where it fits, else a new one."""
        if start == 0 and self.small_frames:
            return self.cap
        return open_video(self.path, 1 if self.small_frames else threads_if_large)[0]

    def _sequential(self, max_side: int, stride: int, skip: int = 0) -> Iterator[tuple[int, np.ndarray]]:
        """One decoder (FFmpeg's threading for large frames), from frame `skip` on."""
        cap = self._capture(threads_if_large=0, start=skip)
        try:
            for _ in range(skip):
                if not cap.grab():
                    return
            for item in prefetch(_decode(cap, max_side, stride, first=skip)):
                if item.small is not None:
                    yield item.index, item.small
        finally:
            cap.release()

    def _decode_chunk(self, chunk: _Chunk, out: Queue, stop: threading.Event, max_side: int, stride: int) -> None:
        """A pool thread: the chunk's frames (from the one before it) into `out`, then `_CHUNK_END`
        or the exception that stopped it; returns early once `stop` is set."""
        try:
            cap = self._capture(max(1, available_cores() // self.workers), start=chunk.start)
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

    def _parallel(self, chunks: list[_Chunk], max_side: int, stride: int) -> Iterator[tuple[int, np.ndarray]]:
        stop = threading.Event()
        upcoming = iter(chunks)
        pending: deque[tuple[_Chunk, Queue]] = deque()

        def submit_next() -> None:
            chunk = next(upcoming, None)
            if chunk is not None:
                pending.append((chunk, Queue()))
                pool.submit(self._decode_chunk, *pending[-1], stop, max_side, stride)

        with ThreadPoolExecutor(self.workers, thread_name_prefix="kimivl-decode") as pool:
            try:
                for _ in range(self.workers):
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
                            yield item.index, item.small
                        previous = item
                    if chunk.stop is not None and (previous is None or previous.index + 1 < chunk.stop):
                        return  # the video ends early (a truncated file), where one decoder stops too
                    submit_next()
            finally:
                stop.set()
                pool.shutdown(wait=False, cancel_futures=True)  # leaving `with` waits for running chunks


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
