"""Scenes with the model: keyframes, the prompt, and a parser that survives any model text.

The seam to the engine is one callable, `Describe`: it gets the keyframes (each with the
`[00:01:23.4]` label to put in the text right before that image) and the prompt to put after
them, and returns the model's text. Everything else here runs without a model.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from string import Template
from typing import Optional

from PIL import Image

from kimivl_cli.engine.events import JsonFormat
from kimivl_cli.media.video import VideoFile, frame_label, frame_time
from kimivl_cli.prompts import load_prompt
from kimivl_cli.tasks.video_scenes.timeline import Scene, scenes_from_starts
from kimivl_cli.video.shots import Candidate, Shot


@dataclass(frozen=True)
class Keyframe:
    frame: int
    seconds: float
    shot: int  # index of the shot it comes from

    @property
    def label(self) -> str:
        return frame_label(self.seconds)


@dataclass(frozen=True)
class TimedFrame:
    """What `Describe` receives per image: put `label` in the text just before `image`."""

    frame: int
    label: str
    seconds: float
    image: Image.Image


Describe = Callable[[Sequence[TimedFrame], str, Optional[JsonFormat]], str]
"""describe(frames_with_timestamps, prompt, json_format) -> model text (the engine provides it);
`json_format` not None asks for JSON of that shape (the local engine guarantees it)."""

# -- keyframes ---------------------------------------------------------------------------------


def choose_keyframes(shots: Sequence[Shot], fps: float, max_frames: int, sample_fps: float) -> list[Keyframe]:
    """Keyframes within and across shots: one in the middle of every shot, then more in long shots.

    The budget is min(max_frames, duration * sample_fps, at least one per shot). When there are
    more shots than `max_frames`, evenly spaced shots get their middle frame. Extra frames go to
    the shots with the most frames per keyframe, spread evenly inside each shot.
    """
    if not shots or max_frames < 1:
        return []
    duration = shots[-1].end
    budget = max(1, min(max_frames, max(len(shots), math.ceil(duration * sample_fps))))
    if len(shots) >= budget:
        picked = [shots[round(i * (len(shots) - 1) / max(1, budget - 1))] for i in range(budget)]
        counts = {shot.index: 1 for shot in picked}
    else:
        counts = {shot.index: 1 for shot in shots}
        for _ in range(budget - len(shots)):
            longest = max(shots, key=lambda s: (s.end_frame - s.start_frame + 1) / (counts[s.index] + 1))
            if (longest.end_frame - longest.start_frame + 1) <= counts[longest.index]:
                break
            counts[longest.index] += 1
    frames: list[Keyframe] = []
    for shot in shots:
        n = counts.get(shot.index, 0)
        length = shot.end_frame - shot.start_frame + 1
        for k in range(n):
            frame = shot.start_frame + min(length - 1, int((k + 0.5) * length / n))
            frames.append(Keyframe(frame, frame / fps, shot.index))
    return sorted(set(frames), key=lambda k: k.frame)


def read_keyframes(path: str | Path, keyframes: Sequence[Keyframe], max_side: int = 896) -> list[TimedFrame]:
    """Decode only the chosen frames (media's `VideoFile.read`: short gaps walked, long ones
    sought), each downscaled to `max_side` as it is decoded and labelled with the decoder's own
    timestamp; keyframes past the end of the video are left out."""
    with VideoFile(path) as video:
        frames = video.read(sorted({k.frame for k in keyframes if k.frame < video.frame_count}), max_side)
    return [TimedFrame(f.index, f.label, f.timestamp, f.to_pil()) for f in frames]


# -- prompts -----------------------------------------------------------------------------------


def scenes_prompt(shots: Sequence[Shot], frame_count: int, prompt_file: str | Path | None = None) -> str:
    """prompts/video_scenes.md (or the user's `--prompt-file`) filled in; unknown `$names` stay as written."""
    duration = shots[-1].end if shots else 0.0
    lines = "\n".join(f"- shot {s.index + 1}: {frame_label(s.start)} - {frame_label(s.end)}" for s in shots)
    return Template(load_prompt("video_scenes.md", prompt_file)).safe_substitute(
        count=frame_count, duration=frame_time(duration), shots=lines, end=frame_time(duration)
    )


def scenes_format(shots: Sequence[Shot]) -> JsonFormat:
    """What prompts/video_scenes.md asks for, as a JSON Schema whose times are the shots' own
    boundaries (scenes are groups of shots): decoding held to it always gives usable scenes."""
    starts = list(dict.fromkeys(frame_time(s.start) for s in shots)) or ["00:00:00.0"]
    ends = list(dict.fromkeys(frame_time(s.end) for s in shots)) or ["00:00:00.0"]
    scene = {
        "type": "object",
        "properties": {"start": {"enum": starts}, "end": {"enum": ends}, "description": {"type": "string"}},
        "required": ["start", "end", "description"],
    }
    return JsonFormat(
        {
            "type": "object",
            "properties": {"scenes": {"type": "array", "minItems": 1, "items": scene}},
            "required": ["scenes"],
        }
    )


def verify_keyframes(candidate: Candidate, fps: float, frames: int, gap: int = 3) -> list[Keyframe]:
    """Two frames before the candidate's span and two after it, `gap` frames apart: what the model judges."""
    first, last = candidate.span[0] - 1, candidate.span[1] + 1
    picks = [first - gap, first, last, last + gap]
    clamped = sorted({min(frames - 1, max(0, f)) for f in picks})
    return [Keyframe(f, f / fps, -1) for f in clamped]


def verify_prompt(candidate: Candidate, fps: float, before: int, after: int) -> str:
    return Template(load_prompt("video_scenes_verify.md")).safe_substitute(
        time=frame_label(candidate.frame / fps), before=before, after=after, reason=candidate.reason
    )


# -- parsing model text ------------------------------------------------------------------------

_THINK = re.compile(r"^.*(?:◁/think▷|</think>)", re.S)
_FENCE = re.compile(r"```(?:json|JSON)?\s*\n?(.*?)(?:```|$)", re.S)
_CLOCK = re.compile(r"^(?:(\d+):)?(\d{1,2}):(\d{1,2}(?:[.,]\d+)?)(?::(\d{1,3}))?$")
_FRAME = re.compile(r"^(?:frame|f|#)\s*(\d+)$", re.I)
_NUMBER = re.compile(r"^(\d+(?:\.\d+)?)\s*(?:s|sec|secs|seconds)?$", re.I)
_LINE = re.compile(
    r"(?P<start>\[?\(?(?:\d+:)*\d+(?:[.,]\d+)?s?\]?\)?)\s*(?:-|–|—|to|-->)\s*"
    r"(?P<end>\[?\(?(?:\d+:)*\d+(?:[.,]\d+)?s?\]?\)?)\s*[:.)\]-]*\s*(?P<text>.*)"
)
_START_KEYS = ("start", "start_time", "begin", "from", "start_timestamp", "start_frame")
_END_KEYS = ("end", "end_time", "stop", "to", "end_timestamp", "end_frame")
_TEXT_KEYS = ("description", "desc", "summary", "caption", "text", "title", "content")


def parse_time(value: object, fps: float) -> float | None:
    """Seconds from `83.4`, `"83.4s"`, `"1:23.4"`, `"00:01:23.400"`, `"00:01:23,4"`, `"00:01:23:10"`
    (SMPTE frames), `"frame 2085"`; None for anything else (never raises)."""
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, (int, float)):
        return float(value) if math.isfinite(value) and value >= 0 else None
    if not isinstance(value, str):
        return None
    text = value.strip().strip("[]()<> ").strip()
    if m := _NUMBER.match(text):
        return float(m.group(1))
    if m := _FRAME.match(text):
        return int(m.group(1)) / fps if fps > 0 else None
    if m := _CLOCK.match(text):
        hours, minutes, seconds, frames = m.groups()
        if float(seconds.replace(",", ".")) >= 60 or (hours is not None and int(minutes) >= 60):
            return None
        total = int(hours or 0) * 3600 + int(minutes) * 60 + float(seconds.replace(",", "."))
        if frames is not None:
            if "," in seconds or "." in seconds or fps <= 0:
                return None
            total += int(frames) / fps
        return total
    return None


def _first_key(item: dict, keys: Sequence[str]) -> object:
    lowered = {str(k).lower(): v for k, v in item.items()}
    return next((lowered[k] for k in keys if k in lowered), None)


def _repair_truncated(text: str) -> object | None:
    """Parse JSON cut off mid-way: close it after the last complete object, as the model meant."""
    for end, closers in reversed(_closing_points(text)[-64:]):
        try:
            return json.loads(text[:end] + closers)
        except ValueError:
            continue
    return None


def _closing_points(text: str) -> list[tuple[int, str]]:
    """(position after each '}' or ']' of the outermost value, closers the value still needs there)."""
    stack: list[str] = []
    closes: list[tuple[int, str]] = []  # (position after a '}' or ']', closers needed there)
    in_string = escape = False
    for i, ch in enumerate(text):
        if in_string:
            if escape:
                escape = False
            elif ch == "\\":
                escape = True
            elif ch == '"':
                in_string = False
        elif ch == '"':
            in_string = True
        elif ch in "{[":
            stack.append("}" if ch == "{" else "]")
        elif ch in "}]":
            if not stack or stack[-1] != ch:
                break
            stack.pop()
            closes.append((i + 1, "".join(reversed(stack))))
            if not stack:
                break
    return closes


def _json_values(text: str) -> Iterator[object]:
    """Every JSON value found in the text: fenced blocks first, then from each '{' or '['."""
    decoder = json.JSONDecoder()
    chunks = [m.group(1) for m in _FENCE.finditer(text)] + [text]
    for chunk in chunks:
        for m in re.finditer(r"[{\[]", chunk):
            try:
                value, _ = decoder.raw_decode(chunk, m.start())
            except ValueError:
                value = _repair_truncated(chunk[m.start() :])
            if isinstance(value, (dict, list)):
                yield value


def _items(value: object) -> list[dict]:
    if isinstance(value, dict):
        for key in ("scenes", "Scenes", "chapters", "segments", "results"):
            if isinstance(value.get(key), list):
                return [v for v in value[key] if isinstance(v, dict)]
        return [value] if _first_key(value, _START_KEYS) is not None else []
    if isinstance(value, list):
        return [v for v in value if isinstance(v, dict)]
    return []


def _raw_scenes(text: str, fps: float) -> list[tuple[float, float | None, str]]:
    """(start, end, description) as the model wrote them, from JSON or from timestamped lines."""
    found: list[tuple[float, float | None, str]] = []
    for value in _json_values(text):
        for item in _items(value):
            start_key = next((k for k in _START_KEYS if k in {str(x).lower() for x in item}), "")
            start_value, end_value = _first_key(item, _START_KEYS), _first_key(item, _END_KEYS)
            if start_key == "start_frame" and isinstance(start_value, int) and fps > 0:
                start, end = start_value / fps, (end_value + 1) / fps if isinstance(end_value, int) else None
            else:
                start, end = parse_time(start_value, fps), parse_time(end_value, fps)
            description = _first_key(item, _TEXT_KEYS)
            if start is not None:
                found.append((start, end, description if isinstance(description, str) else ""))
        if found:
            return found
    for line in text.splitlines():
        if m := _LINE.search(line):
            start, end = parse_time(m.group("start"), fps), parse_time(m.group("end"), fps)
            if start is not None:
                found.append((start, end, m.group("text").strip()))
    return found


def _snap(seconds: float, shot_starts: Sequence[float]) -> float:
    return min(shot_starts, key=lambda s: abs(s - seconds))


def parse_scenes(text: str, shots: Sequence[Shot], fps: float, frames: int) -> tuple[list[Scene], list[str]]:
    """Scenes from model text, starts snapped to the detected shots. Never raises: garbage gives the
    shot-based scenes and a warning."""
    try:
        return _parse_scenes(text, shots, fps, frames)
    except Exception as exc:  # model text is arbitrary; a parser bug must not lose the shots
        return shot_scenes(shots, fps, frames), [f"could not read the model's scenes ({type(exc).__name__})"]


def _parse_scenes(text: str, shots: Sequence[Shot], fps: float, frames: int) -> tuple[list[Scene], list[str]]:
    text = _THINK.sub("", text if isinstance(text, str) else "")
    duration = frames / fps
    raw = [(s, e, d) for s, e, d in _raw_scenes(text, fps) if 0 <= s < duration + 1.0]
    if not raw:
        return shot_scenes(shots, fps, frames), ["the model's answer had no usable scenes; using the detected shots"]
    shot_starts = [s.start for s in shots] or [0.0]
    described: dict[int, str] = {}
    for start, _end, description in sorted(raw, key=lambda r: r[0]):
        frame = round(_snap(start, shot_starts) * fps)
        frame = 0 if frame < 1 else frame
        if description and frame not in described:
            described[frame] = description.strip()
        else:
            described.setdefault(frame, "")
    described.setdefault(0, "")
    starts = sorted(described)
    return scenes_from_starts(starts, frames, fps, [described[s] for s in starts]), []


def shot_scenes(shots: Sequence[Shot], fps: float, frames: int) -> list[Scene]:
    """One scene per detected shot, without descriptions (the fallback and `--shots-only`)."""
    return scenes_from_starts([s.start_frame for s in shots], frames, fps)


def parse_verdict(text: str) -> bool | None:
    """The model's yes/no on an uncertain shot boundary (`--verify-shots`); None if it did not say."""
    words = re.findall(r"[a-z]+", _THINK.sub("", text).lower())
    return True if "yes" in words[:5] else False if "no" in words[:5] else None
