"""Our own streaming shot detector: hard cuts, dissolves and fades on downscaled frames.

Every sampled frame is shrunk to `max_side` pixels (96 by default) and reduced to a few
features: a grayscale image, its zero-mean/unit-variance copy (brightness-invariant), and a
16x4x4 HSV histogram. Three tests run on a sliding window of those features:

- **cut** at frame i: the content distance between i-1 and i is above `threshold` and well
  above the median of its neighbours (fast camera motion raises the neighbours too), and no
  pair of frames bridging i within `flash_len` frames looks alike (a flash returns to the
  previous content; a cut does not).
- **dissolve**: over a window i-K..i+K the inner frames are a linear blend of the two ends
  (camera motion is not), and the ends differ. Consecutive flagged frames form a region whose
  middle becomes the boundary.
- **fade** through black or white: a run of flat frames joined with the ramps on either side.

A gradual region is only a boundary when the content before it differs from the content after
it: a slow brightness flash or a fade-out/fade-in of the same shot is reported as an
"uncertain" candidate for `--verify-shots` instead. The first and last frames never start a
boundary that cannot be confirmed by frames on both sides.

Cost: O(N) in the number of sampled frames, small beside decoding (which `media.video.VideoFile.stream`
spreads over the cores; figures in docs/performance.md); the flash test adds O(L^2) distance
evaluations only at frames above the threshold. Memory is constant: a ring buffer of
`2 * lookahead + 2` frame features (a few KB each) plus the list of boundaries found; frames are
never kept. With `stride > 1` only every stride-th frame is converted and analysed (the others
are still decoded, as the codec needs them), so cut positions are exact to `stride - 1` frames.
"""

from __future__ import annotations

import itertools
import time
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal

import cv2
import numpy as np

from kimivl_cli.errors import InputError
from kimivl_cli.media.video import VideoFile

BoundaryKind = Literal["cut", "dissolve", "fade"]
CandidateKind = Literal["flash", "gradual", "cut"]


@dataclass(frozen=True)
class DetectorParams:
    """Knobs of the detector. Distances are on a 0..1 scale; lengths are in analysed frames."""

    threshold: float = 0.4
    """Content distance between neighbouring frames that makes a cut."""
    min_scene_len: int = 15
    """Fewest frames between two boundaries (the last shot of a video may be shorter)."""
    max_side: int = 96
    """Longest side of the analysed frames, in pixels."""
    stride: int = 1
    """Analyse every stride-th frame (0: 1 up to 30 fps, 2 up to 60 fps, ...)."""
    flash_len: int = 4
    """Longest flash (frames) that is told apart from a cut."""
    dissolve_half: int = 6
    """Half-window K of the dissolve test."""
    blend_residual: float = 0.3
    """How far the middle frames may stray from a linear blend of the ends (relative)."""

    def __post_init__(self) -> None:
        if not 0.0 < self.threshold < 1.0:
            raise InputError(f"`threshold` {self.threshold} is out of range", "use a value between 0 and 1, e.g. 0.4")
        if self.min_scene_len < 1:
            raise InputError("`min_scene_len` must be at least 1 frame")
        if self.max_side < 16:
            raise InputError("the analysis size must be at least 16 pixels")
        if self.stride < 0:
            raise InputError("the frame stride must be 0 (auto) or more")


@dataclass(frozen=True)
class Boundary:
    """Where a new shot starts (`frame`), how it got there, and the frames the transition covers."""

    frame: int
    kind: BoundaryKind
    confidence: float
    span: tuple[int, int]


@dataclass(frozen=True)
class Candidate:
    """Something the detector was unsure about: a question for the model (`--verify-shots`)."""

    frame: int
    kind: CandidateKind
    score: float
    span: tuple[int, int]
    reason: str


@dataclass(frozen=True)
class Shot:
    index: int
    start_frame: int
    end_frame: int  # inclusive
    start: float  # seconds
    end: float  # seconds, exclusive: the start of the next shot
    boundary: Boundary | None  # the transition that starts this shot (None for the first)


@dataclass
class ShotList:
    video: str
    fps: float
    frames: int
    shots: list[Shot]
    boundaries: list[Boundary]
    uncertain: list[Candidate]
    seconds: float = 0.0
    """Wall time of decoding plus detection."""
    warnings: list[str] = field(default_factory=list)


@dataclass
class _Frame:
    index: int
    gray: np.ndarray  # float32 h x w, 0..255
    norm: np.ndarray  # flattened zero mean, unit variance copy (None when the frame is nearly uniform)
    hist: np.ndarray  # 256 bins, sums to 1
    mean: float
    flat: bool
    step: float = 0.0  # content distance to the previous analysed frame


def _features(index: int, small_rgb: np.ndarray) -> _Frame:
    gray = cv2.cvtColor(small_rgb, cv2.COLOR_RGB2GRAY).astype(np.float32)
    hsv = cv2.cvtColor(small_rgb, cv2.COLOR_RGB2HSV)
    hist = cv2.calcHist([hsv], [0, 1, 2], None, [16, 4, 4], [0, 180, 0, 256, 0, 256]).ravel()
    hist /= max(float(hist.sum()), 1.0)
    means, stds = cv2.meanStdDev(gray)
    mean, std = float(means[0, 0]), float(stds[0, 0])
    norm = ((gray - mean) / std).ravel() if std > 2.0 else None
    flat = std < 8.0 and (mean < 32.0 or mean > 224.0)
    return _Frame(index, gray, norm, hist, mean, flat)


def _mean_abs_diff(a: np.ndarray, b: np.ndarray) -> float:
    """mean(|a - b|) in one OpenCV pass (cheaper than numpy's abs + mean on these small frames)."""
    return cv2.norm(a, b, cv2.NORM_L1) / a.size


def distance(a: _Frame, b: _Frame) -> float:
    """Content distance in 0..1: mean of histogram change, pixel change and decorrelation."""
    hist = 0.5 * cv2.norm(a.hist, b.hist, cv2.NORM_L1)
    pixels = min(1.0, _mean_abs_diff(a.gray, b.gray) / 64.0)
    corr = float(a.norm @ b.norm) / a.norm.size if a.norm is not None and b.norm is not None else 0.0
    return (hist + pixels + min(1.0, max(0.0, 1.0 - corr))) / 3.0


def _blend_residual(a: _Frame, mids: Iterable[tuple[float, _Frame]], b: _Frame) -> float:
    """Largest distance of the middle frames from the linear blend of the ends, relative to |a - b|."""
    scale = _mean_abs_diff(a.gray, b.gray) + 1.0
    return max(_mean_abs_diff(m.gray, cv2.addWeighted(a.gray, 1 - t, b.gray, t, 0.0)) for t, m in mids) / scale


@dataclass
class _Region:
    """A run of frames that look like part of a gradual transition."""

    first: int
    last: int
    before: _Frame | None  # content just before the transition
    flat: list[int] = field(default_factory=list)
    strength: float = 0.0


class ShotDetector:
    """Push frames in order with `push`, then `finish`; boundaries come out as they are decided.

    The detector only looks `lookahead` analysed frames ahead and `lookahead + 1` behind, so
    memory does not grow with the video. Frame indices are whatever the caller passes (the real
    frame numbers when striding).
    """

    def __init__(self, params: DetectorParams = DetectorParams(), stride: int = 1) -> None:
        self.p = params
        self.k = params.dissolve_half
        self.reach = self.k * stride  # the dissolve half-window in frame numbers
        self.lookahead = max(self.k + 1, params.flash_len + 1, 4)
        self.window: deque[_Frame] = deque(maxlen=2 * self.lookahead + 2)
        self.boundaries: list[Boundary] = []
        self.uncertain: list[Candidate] = []
        self.region: _Region | None = None

    # -- input -------------------------------------------------------------------------------

    def push(self, index: int, small_rgb: np.ndarray) -> None:
        frame = _features(index, small_rgb)
        if self.window:
            frame.step = distance(self.window[-1], frame)
        self.window.append(frame)
        if len(self.window) > self.lookahead:
            self._decide(len(self.window) - 1 - self.lookahead)

    def finish(self) -> list[Boundary]:
        """Decide the frames still waiting for lookahead and return all boundaries in order."""
        start = max(0, len(self.window) - self.lookahead)
        for pos in range(start, len(self.window)):
            self._decide(pos)
        self._close_region(self.window[-1] if self.window else None, complete=False)
        return _enforce_min_len(sorted(self.boundaries, key=lambda b: b.frame), self.p.min_scene_len)

    # -- decisions at one frame ----------------------------------------------------------------

    def _decide(self, pos: int) -> None:
        w, f = self.window, self.window[pos]
        if pos > 0 or f.index > 0:
            self._test_cut(pos)
        dissolving = self._test_dissolve(pos)
        if dissolving or f.flat:
            if self.region is None:
                before = w[pos - self.k - 1] if pos - self.k - 1 >= 0 else None
                self.region = _Region(f.index, f.index, before)
            self.region.last = f.index
            self.region.strength = max(self.region.strength, dissolving)
            if f.flat:
                self.region.flat.append(f.index)
        elif self.region is not None and f.index - self.region.last > self.reach:
            self._close_region(f, complete=True)

    def _test_cut(self, pos: int) -> None:
        w, p = self.window, self.p
        f = w[pos]
        if f.step < p.threshold or pos == 0:
            return
        lo, hi = max(0, pos - 4), min(len(w), pos + 5)
        neighbours = [w[j].step for j in range(lo, hi) if j != pos and j > 0]
        local = float(np.median(neighbours)) if neighbours else 0.0
        span = (f.index, f.index)
        if f.step - local < 0.5 * p.threshold:
            self.uncertain.append(Candidate(f.index, "cut", f.step, span, "large change amid fast motion"))
            return
        if pos + 1 >= len(w):
            self.uncertain.append(Candidate(f.index, "cut", f.step, span, "change on the last frame"))
            return
        bridge = min(
            (
                distance(w[a], w[b])
                for a in range(max(0, pos - p.flash_len - 1), pos)
                for b in range(pos, min(len(w), pos + p.flash_len + 1))
                if (a, b) != (pos - 1, pos) and b - a <= p.flash_len + 1
            ),
            default=1.0,
        )
        if bridge < 0.5 * max(p.threshold, f.step):
            self.uncertain.append(Candidate(f.index, "flash", f.step, span, "content returns after a brief change"))
            return
        confidence = min(1.0, 0.5 + (f.step - local) / (2 * p.threshold)) * min(1.0, bridge / p.threshold)
        self.boundaries.append(Boundary(f.index, "cut", round(confidence, 3), span))

    def _test_dissolve(self, pos: int) -> float:
        """How strongly the window around `pos` is a linear blend between two different frames (0: not)."""
        w, k = self.window, self.k
        if pos - k < 0 or pos + k >= len(w):
            return 0.0
        a, b = w[pos - k], w[pos + k]
        if max(w[j].step for j in range(pos - k + 1, pos + k + 1)) >= self.p.threshold:
            return 0.0  # a hard cut inside: the cut test owns it
        change = distance(a, b)
        if change < 0.5 * self.p.threshold:
            return 0.0
        mids = [(j / (2 * k), w[pos - k + j]) for j in (k // 2, k, k + k // 2)]
        residual = _blend_residual(a, mids, b)
        return change if residual <= self.p.blend_residual else 0.0

    def _close_region(self, after: _Frame | None, complete: bool) -> None:
        region, self.region = self.region, None
        if region is None:
            return
        span = (max(0, region.first - self.reach), region.last + self.reach)
        if region.flat:
            kind: BoundaryKind = "fade"
            frame = region.flat[len(region.flat) // 2]
        else:
            kind = "dissolve"
            frame = (region.first + region.last + 1) // 2
        if region.before is None or after is None or not complete or after.flat or region.before.flat:
            if kind == "dissolve" or region.before is not None:
                reason = "gradual change at the start or end of the video"
                self.uncertain.append(Candidate(frame, "gradual", region.strength, span, reason))
            return
        change = distance(region.before, after)
        if change < 0.5 * self.p.threshold:
            self.uncertain.append(Candidate(frame, "flash", change, span, "same content before and after"))
            return
        if kind == "dissolve" and region.last - region.first < 1 and region.strength < self.p.threshold:
            self.uncertain.append(Candidate(frame, "gradual", region.strength, span, "short weak blend"))
            return
        confidence = min(1.0, change / self.p.threshold) * (1.0 if kind == "fade" else 0.9)
        self.boundaries.append(Boundary(frame, kind, round(confidence, 3), span))


def _enforce_min_len(boundaries: list[Boundary], min_len: int) -> list[Boundary]:
    """Drop boundaries closer than `min_len` to the start or to a stronger neighbour."""
    kept: list[Boundary] = []
    for b in boundaries:
        if b.frame < min_len:
            continue
        if kept and b.frame - kept[-1].frame < min_len:
            if b.confidence > kept[-1].confidence:
                kept[-1] = b
            continue
        kept.append(b)
    return kept


def with_confirmed(shots: ShotList, confirmed: Iterable[Candidate], min_len: int) -> ShotList:
    """The shot list with the candidates the model confirmed as boundaries (`--verify-shots`).

    Detected boundaries keep priority: a confirmed candidate closer than `min_len` to one is dropped.
    """
    kinds: dict[CandidateKind, BoundaryKind] = {"cut": "cut", "flash": "cut", "gradual": "dissolve"}
    extra = [Boundary(c.frame, kinds[c.kind], 0.0, c.span) for c in confirmed]
    merged = _enforce_min_len(sorted([*shots.boundaries, *extra], key=lambda b: b.frame), min_len)
    return replace(shots, boundaries=merged, shots=shots_from_boundaries(merged, shots.frames, shots.fps))


def auto_stride(fps: float) -> int:
    """Frame skipping that stays safe for the dissolve window and 1-frame cut tolerance at high rates."""
    return max(1, round(fps / 30.0))


def detect_shots(path: str | Path, params: DetectorParams = DetectorParams(), workers: int | None = None) -> ShotList:
    """Stream a video file through `ShotDetector` and cut it into shots (InputError if it has no frames).

    `workers`: parallel decoders (see `media.video.VideoFile.stream`; default one per core, at most 4).
    """
    started = time.perf_counter()
    frames = 0
    with VideoFile(path) as video:
        fps, count = video.fps, video.declared_frames
        stride = params.stride or auto_stride(fps)
        detector = ShotDetector(params, stride)
        for frame in video.stream(params.max_side, stride, workers):
            detector.push(frame.index, frame.image)
            frames = frame.index + 1
    if frames == 0:
        raise InputError(f"{path}: no frame could be decoded (empty or truncated video)", "check the file plays")
    boundaries = detector.finish()
    warnings = []
    if count is not None and frames < count - stride:
        warnings.append(f"{Path(path).name}: decoding stopped at frame {frames} of {count} (truncated file?)")
    return ShotList(
        video=str(path),
        fps=fps,
        frames=frames,
        shots=shots_from_boundaries(boundaries, frames, fps),
        boundaries=boundaries,
        uncertain=detector.uncertain,
        seconds=time.perf_counter() - started,
        warnings=warnings,
    )


def frame_spans(starts: Iterable[int], frames: int) -> list[tuple[int, int]]:
    """(first, last) frames of consecutive segments covering 0..frames-1, one beginning at each
    start: the one segment-list rule for shots and scenes (0 added, duplicates and starts outside
    the video dropped)."""
    firsts = sorted({s for s in starts if 0 < s < frames} | {0})
    return [(first, following - 1) for first, following in itertools.pairwise([*firsts, frames])]


def shots_from_boundaries(boundaries: list[Boundary], frames: int, fps: float) -> list[Shot]:
    """Consecutive shots covering frames 0..frames-1, one starting at each boundary."""
    by_frame = {b.frame: b for b in boundaries}
    return [
        Shot(i, first, last, first / fps, (last + 1) / fps, by_frame.get(first) if first else None)
        for i, (first, last) in enumerate(frame_spans(by_frame, frames))
    ]
