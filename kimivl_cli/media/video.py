"""Video files (OpenCV's FFmpeg backend): properties, frame sampling with exact timestamps.

Every `Frame` carries the decoder's own position (`CAP_PROP_POS_MSEC` after the grab, i.e. the
frame's presentation time) rather than `index / fps`, so timestamps stay true on variable frame
rate files. Reading N sparse frames: `grab()` walks forward without converting or copying the
skipped frames (they are still decoded: H.264 needs them); gaps longer than `SEEK_GAP` frames
seek instead, which jumps to the nearest keyframe before the target and decodes from there.
Which is faster depends on the keyframe interval, so the rule is a fixed, deterministic one.
Measured here, 16 uniform samples: bikes.mp4 (H.264, one keyframe in 250 frames) 0.29 s walking
vs 1.5 s seeking each (every seek decodes again from frame 0); a 3000-frame MPEG-4 file with a
keyframe every 12 frames (gaps of 187) 0.75 s walking vs 0.11 s seeking. Both ways give
bit-identical frames and timestamps (tested).

Importing this module silences OpenCV's and FFmpeg's logging on stderr (unless `KIMIVL_DEBUG=1`
or the user set `OPENCV_LOG_LEVEL` / `OPENCV_FFMPEG_LOGLEVEL`): they would print lines like
"moov atom not found" beside our one-line error, which already says what is wrong.
"""

from __future__ import annotations

import math
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

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
    frame count, frames are counted once at open). In-memory inputs (stdin) are spooled to a
    temporary file, since FFmpeg reads from a path; it is deleted on `close()`.
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
        self._cap, self.fps = self._open()
        try:
            self.width = int(self._cap.get(cv2.CAP_PROP_FRAME_WIDTH))
            self.height = int(self._cap.get(cv2.CAP_PROP_FRAME_HEIGHT))
            count = int(self._cap.get(cv2.CAP_PROP_FRAME_COUNT))
            if not self._cap.grab():
                raise InputError(f"{self.name}: no decodable frames", "is the file truncated or the codec unsupported?")
            self._next = 1  # index of the frame the next grab() returns
            if self.width <= 0 or self.height <= 0:
                raise InputError(f"{self.name}: the video reports no frame size")
            self.frame_count = count if count > 0 else self._count_frames()
        except BaseException:
            self.close()
            raise

    @property
    def duration(self) -> float:
        """Seconds, from the frame count and rate."""
        return self.frame_count / self.fps

    def __enter__(self) -> VideoFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
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
                self._cap.set(cv2.CAP_PROP_POS_FRAMES, target)
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


def _fitted(width: int, height: int, max_side: int | None) -> tuple[int, int]:
    """(width, height) scaled down to fit `max_side`, aspect kept (PIL's `thumbnail` rounding)."""
    if max_side is None or max(width, height) <= max_side:
        return width, height
    scale = max_side / max(width, height)
    return max(1, round(width * scale)), max(1, round(height * scale))
