"""Scenes on a video's timeline and the timecodes every output format is written in."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from kimivl_cli.video.shots import frame_spans


@dataclass(frozen=True)
class Scene:
    """Frames start_frame..end_frame (inclusive); times in seconds, `end` exclusive (= next start)."""

    index: int  # 1-based, as editors and PySceneDetect count
    start_frame: int
    end_frame: int
    start: float
    end: float
    description: str = ""

    @property
    def title(self) -> str:
        return self.description.strip().splitlines()[0] if self.description.strip() else f"Scene {self.index}"


@dataclass
class SceneList:
    video: str
    fps: float
    frames: int
    scenes: list[Scene]
    warnings: list[str] = field(default_factory=list)


def scenes_from_starts(
    starts: list[int], frames: int, fps: float, descriptions: list[str] | None = None
) -> list[Scene]:
    """Consecutive scenes covering 0..frames-1, one beginning at each start frame; `descriptions`
    in the order of the sorted, unique starts."""
    texts = descriptions or []
    return [
        Scene(i + 1, first, last, first / fps, (last + 1) / fps, texts[i] if i < len(texts) else "")
        for i, (first, last) in enumerate(frame_spans(starts, frames))
    ]


def clock(seconds: float, decimals: int = 3, comma: bool = False) -> str:
    """HH:MM:SS.mmm (or with `decimals` digits; a comma for SRT). Rounds, never shows 60 seconds."""
    scale = 10**decimals
    ticks = round(max(0.0, seconds) * scale)
    whole, frac = divmod(ticks, scale)
    h, rest = divmod(whole, 3600)
    m, s = divmod(rest, 60)
    text = f"{h:02d}:{m:02d}:{s:02d}"
    if decimals:
        text += ("," if comma else ".") + f"{frac:0{decimals}d}"
    return text


def short_clock(seconds: float) -> str:
    """YouTube chapter style: M:SS, or H:MM:SS past an hour (floored, as players show it)."""
    whole = math.floor(max(0.0, seconds))
    h, rest = divmod(whole, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


def smpte(frame: int, fps: float) -> str:
    """Non-drop-frame SMPTE timecode HH:MM:SS:FF at the nominal (rounded) frame rate."""
    base = max(1, round(fps))
    frames = max(0, frame)
    h, rest = divmod(frames, 3600 * base)
    m, rest = divmod(rest, 60 * base)
    s, f = divmod(rest, base)
    return f"{h:02d}:{m:02d}:{s:02d}:{f:02d}"
