"""`video-scenes` end to end: detect shots, optionally ask the model for scenes, write a format.

Kept out of the CLI so that tests and other front ends drive it with a fake `Describe`.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path

from kimivl_cli.errors import InputError
from kimivl_cli.files import write_atomic
from kimivl_cli.guards import check_output
from kimivl_cli.tasks.pool import ordered_map
from kimivl_cli.tasks.video_scenes.formats import FORMATS, render_many
from kimivl_cli.tasks.video_scenes.scenes import (
    Describe,
    Keyframe,
    choose_keyframes,
    parse_scenes,
    parse_verdict,
    read_keyframes,
    scenes_format,
    scenes_prompt,
    shot_scenes,
    verify_keyframes,
    verify_prompt,
)
from kimivl_cli.tasks.video_scenes.timeline import SceneList
from kimivl_cli.video.shots import Candidate, DetectorParams, ShotList, detect_shots, with_confirmed

MULTI_VIDEO_FORMATS = ("json", "jsonl", "md")
EXTENSIONS = {fmt: f".{fmt}" for fmt in FORMATS} | {"chapters": ".chapters.txt", "ffmetadata": ".ffmetadata.txt"}


@dataclass(frozen=True)
class VideoScenesOptions:
    detector: DetectorParams = field(default_factory=DetectorParams)
    max_frames: int = 32
    """Most keyframes sent to the model per video."""
    sample_fps: float = 1.0
    """Keyframes per second of video, before the `max_frames` cap."""
    verify_shots: bool = False
    """Ask the model about each candidate the detector was unsure of (needs `describe`)."""
    prompt_file: Path | None = None
    """The user's replacement for prompts/video_scenes.md."""
    concurrency: int = 1
    """`--verify-shots` questions asked at once (`describe` must then be thread-safe)."""

    def __post_init__(self) -> None:
        if not 0 < self.sample_fps < math.inf:
            raise InputError(f"`fps` {self.sample_fps}: keyframes per second must be a positive, finite number")
        if self.max_frames < 1 or self.concurrency < 1:
            raise InputError("`max_frames` and `concurrency` must be at least 1")


@dataclass
class VideoResult:
    scenes: SceneList
    shots: ShotList


def check_request(videos: list[str], fmt: str, output: str | None, force: bool) -> list[Path] | None:
    """Refuse bad combinations before any decoding or model loading.

    `output` ending in `/` (or an existing folder) is a folder, created if missing: one file per
    video in it (`talk.mp4` -> `FOLDER/talk.srt`), the list returned. Otherwise None: everything
    goes to stdout or into the one file `output`. Formats that hold one video (csv, srt, vtt, edl,
    chapters, ffmetadata) need a folder for several videos.
    """
    if fmt not in FORMATS:
        raise InputError(f"unknown `fmt` {fmt!r}", f"use one of {', '.join(FORMATS)}")
    if output is not None and (output.endswith(("/", os.sep)) or Path(output).is_dir()):
        files = per_video_files(videos, fmt, Path(output), force)
        output_folder(Path(output))
        return files
    if output is not None:
        check_output(Path(output))
    if len(videos) > 1 and fmt not in MULTI_VIDEO_FORMATS:
        raise InputError(
            f"`fmt` {fmt} holds one video",
            f"pass -o FOLDER/ (a trailing slash makes a folder) for one file per video, or use "
            f"{', '.join(MULTI_VIDEO_FORMATS)}",
        )
    path = Path(output) if output is not None else None
    if path is not None and path.exists() and not force:
        raise InputError(f"{path} already exists", "pass `force` to overwrite it")
    if path is not None and not path.parent.is_dir():
        raise InputError(
            f"{path.parent} is not a folder", "create it first, or end -o with / to write into a new folder"
        )
    return None


def output_folder(folder: Path) -> Path:
    """`folder`, created (with its parents) if missing; InputError if it cannot be."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise InputError(f"{folder} is a file, not a folder", "drop the trailing / to write into one file") from None
    except OSError as exc:
        raise InputError(f"cannot create the folder {folder}: {exc.strerror or exc}") from None
    return folder


def per_video_files(videos: list[str], fmt: str, folder: Path, force: bool) -> list[Path]:
    """FOLDER/<video stem>.<format's extension> for each video; clashes and (without --force) existing files refused."""
    files = [folder / f"{Path(video).stem}{EXTENSIONS[fmt]}" for video in videos]
    seen: dict[Path, str] = {}
    for video, path in zip(videos, files, strict=True):
        if path in seen:
            raise InputError(f"{seen[path]} and {video} would both be written to {path}", "rename one, or run twice")
        seen[path] = video
        check_output(path)
        if path.exists() and not force:
            raise InputError(f"{path} already exists", "pass `force` to overwrite it")
    return files


def video_scenes(video: str | Path, options: VideoScenesOptions, describe: Describe | None = None) -> VideoResult:
    """Shots of one video, grouped into described scenes when `describe` is given (else one scene per shot)."""
    shots = detect_shots(video, options.detector)
    warnings = list(shots.warnings)
    if describe is not None and options.verify_shots and shots.uncertain:
        shots, note = verify_shots(video, shots, describe, options.detector.min_scene_len, options.concurrency)
        warnings.append(note)
    if describe is None:
        scenes = shot_scenes(shots.shots, shots.fps, shots.frames)
    else:
        keyframes = choose_keyframes(shots.shots, shots.fps, options.max_frames, options.sample_fps)
        frames = read_keyframes(video, keyframes)
        prompt = scenes_prompt(shots.shots, len(frames), options.prompt_file)
        # our prompt asks for this JSON; a user's own prompt may ask for something else
        text = describe(frames, prompt, scenes_format(shots.shots) if options.prompt_file is None else None)
        scenes, notes = parse_scenes(text, shots.shots, shots.fps, shots.frames)
        warnings += notes
    return VideoResult(SceneList(str(video), shots.fps, shots.frames, scenes, warnings), shots)


def verify_shots(
    video: str | Path, shots: ShotList, describe: Describe, min_len: int, concurrency: int = 1
) -> tuple[ShotList, str]:
    """The detector proposes, the model confirms: one yes/no question per uncertain candidate.

    All candidates' frames are decoded in one streaming pass. An unclear answer counts as "no"
    (the detector's choice stands). Cost: one model call of four frames per candidate, up to
    `concurrency` of them at once.
    """
    per_candidate = [verify_keyframes(c, shots.fps, shots.frames) for c in shots.uncertain]
    decoded = {f.frame: f for f in read_keyframes(video, [k for keys in per_candidate for k in keys])}

    def confirms(pair: tuple[Candidate, list[Keyframe]]) -> bool:
        candidate, keys = pair
        frames = [decoded[k.frame] for k in keys if k.frame in decoded]
        before = sum(k.frame < candidate.span[0] for k in keys if k.frame in decoded)
        prompt = verify_prompt(candidate, shots.fps, before, len(frames) - before)
        return bool(frames) and parse_verdict(describe(frames, prompt, None))

    pairs = list(zip(shots.uncertain, per_candidate, strict=True))
    verdicts = ordered_map(confirms, pairs, concurrency)
    confirmed = [candidate for (candidate, _), yes in zip(pairs, verdicts, strict=True) if yes]
    checked = with_confirmed(shots, confirmed, min_len)
    added = len(checked.boundaries) - len(shots.boundaries)
    note = f"--verify-shots: the model confirmed {len(confirmed)} of {len(shots.uncertain)} uncertain shot changes"
    return checked, note + (f" ({added} added)" if added != len(confirmed) else "")


def write_output(lists: list[SceneList], fmt: str, output: Path | None, force: bool) -> str | None:
    """The rendered text for stdout (output None), or write it atomically to `output`."""
    text = render_many(lists, fmt)
    if output is None:
        return text
    if output.exists() and not force:  # checked again: it may have appeared while we worked
        raise InputError(f"{output} already exists", "pass `force` to overwrite it")
    write_atomic(output, text)
    return None
