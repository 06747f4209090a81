"""Scene lists as text for people, players, editors and scripts: one writer per `--format`.

json    {"video", "fps", "frames", "scenes": [{"index", "start_frame", "end_frame", "start", "end", "description"}]}
jsonl   one scene object per line, with "video"
csv     PySceneDetect's `list-scenes` layout (a "Timecode List:" row, then its ten columns; 1-based
        start frames, end frames inclusive), so scripts written for it read ours, plus a last
        "Description" column
srt/vtt one subtitle cue per scene (the description, or "Scene N")
md      a Markdown table plus a YouTube-style chapter list to paste into a description
edl     CMX3600 edit decision list, one cut event per scene (non-drop-frame timecode)
chapters YouTube-style chapters, `0:00 Title` per line, to paste into a video description
ffmetadata FFmpeg metadata chapters (`ffmpeg -i in.mp4 -i chapters.txt -map_metadata 1 -codec copy out.mp4`)
"""

from __future__ import annotations

import csv
import io
import json
import re
from collections.abc import Callable
from pathlib import Path

from kimivl_cli.tasks.video_scenes.timeline import SceneList, clock, short_clock, smpte


def _scene_dict(scene) -> dict:
    return {
        "index": scene.index,
        "start_frame": scene.start_frame,
        "end_frame": scene.end_frame,
        "start": round(scene.start, 3),
        "end": round(scene.end, 3),
        "description": scene.description,
    }


def to_json(sl: SceneList) -> str:
    doc = {"video": sl.video, "fps": sl.fps, "frames": sl.frames, "scenes": [_scene_dict(s) for s in sl.scenes]}
    return json.dumps(doc, indent=2, ensure_ascii=False) + "\n"


_LINE_BREAKS_JSON = str.maketrans({"\u2028": "\\u2028", "\u2029": "\\u2029", "\x85": "\\u0085"})
"""Line breaks that JSON leaves raw but `str.splitlines` (and some JSONL readers) split on."""


def to_jsonl(sl: SceneList) -> str:
    return "".join(
        json.dumps({"video": sl.video, **_scene_dict(s)}, ensure_ascii=False).translate(_LINE_BREAKS_JSON) + "\n"
        for s in sl.scenes
    )


def to_csv(sl: SceneList) -> str:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["Timecode List:", *(clock(s.start) for s in sl.scenes[1:])])
    writer.writerow(
        [
            "Scene Number",
            "Start Frame",
            "Start Timecode",
            "Start Time (seconds)",
            "End Frame",
            "End Timecode",
            "End Time (seconds)",
            "Length (frames)",
            "Length (timecode)",
            "Length (seconds)",
            "Description",
        ]
    )
    for s in sl.scenes:
        length = s.end - s.start
        writer.writerow(
            [
                s.index,
                s.start_frame + 1,
                clock(s.start),
                f"{s.start:.3f}",
                s.end_frame + 1,
                clock(s.end),
                f"{s.end:.3f}",
                s.end_frame - s.start_frame + 1,
                clock(length),
                f"{length:.3f}",
                " ".join(s.description.split()),
            ]
        )
    return out.getvalue()


def _one_line(text: str) -> str:
    """Every run of whitespace, line breaks included (LF, CR, U+2028...), as one space."""
    return " ".join(text.split())


def _cue_text(scene) -> str:
    # A blank line would end the cue early; an arrow (any "-->", "--->" included) would read as a
    # timing line. Lines keep their breaks (CR, U+2028... become newlines: players split on those too).
    lines = [_one_line(line) for line in (scene.description or f"Scene {scene.index}").splitlines()]
    return re.sub(r"-{2,}>", "->", "\n".join(line for line in lines if line)) or f"Scene {scene.index}"


def to_srt(sl: SceneList) -> str:
    cues = [
        f"{s.index}\n{clock(s.start, comma=True)} --> {clock(s.end, comma=True)}\n{_cue_text(s)}\n" for s in sl.scenes
    ]
    return "\n".join(cues)


def _vtt_escape(text: str) -> str:
    """WebVTT cue text: `&` and `<` start entities and tags (`<c>`, `<v>`), so they are escaped."""
    return text.replace("&", "&amp;").replace("<", "&lt;")


def to_vtt(sl: SceneList) -> str:
    cues = [f"{s.index}\n{clock(s.start)} --> {clock(s.end)}\n{_vtt_escape(_cue_text(s))}\n" for s in sl.scenes]
    return "WEBVTT\n\n" + "\n".join(cues)


def _md_cell(text: str) -> str:
    """Text for one Markdown line (a table cell, a heading): one line, with the characters that would
    end the cell (`|`), undo an escape (`\\`), open HTML or a comment (`<`) or close a heading (`#`) escaped."""
    return re.sub(r"([\\|<#])", r"\\\1", _one_line(text))


def _fence(lines: list[str]) -> str:
    """A code fence longer than any run of backticks in `lines`, so none of them can close it."""
    longest = max((len(run) for line in lines for run in re.findall(r"`+", line)), default=0)
    return "`" * max(3, longest + 1)


def to_md(sl: SceneList) -> str:
    lines = [
        f"# Scenes of {_md_cell(Path(sl.video).name)}",
        "",
        "| # | start | end | frames | description |",
        "|---|---|---|---|---|",
    ]
    for s in sl.scenes:
        cells = [str(s.index), clock(s.start, 1), clock(s.end, 1), f"{s.start_frame}-{s.end_frame}"]
        lines.append("| " + " | ".join([*cells, _md_cell(s.description)]) + " |")
    chapters = youtube_chapters(sl)  # verbatim inside the fence
    fence = _fence(chapters)
    lines += ["", "Chapters (YouTube style):", "", f"{fence}text", *chapters, fence, ""]
    return "\n".join(lines)


def youtube_chapters(sl: SceneList) -> list[str]:
    """`0:00 Title`, one line per scene, as YouTube reads chapters from a video's description."""
    return [f"{short_clock(s.start)} {_one_line(s.title)}" for s in sl.scenes]


def to_chapters(sl: SceneList) -> str:
    return "\n".join(youtube_chapters(sl)) + "\n"


def to_edl(sl: SceneList) -> str:
    """CMX3600: each scene is a cut event; source and record timecodes match (the video as one reel)."""
    title = _one_line(Path(sl.video).stem)[:70] or "kimivl"  # one line each: a newline in a name would add events
    lines = [f"TITLE: {title}", "FCM: NON-DROP FRAME", ""]
    for s in sl.scenes:
        tc_in, tc_out = smpte(s.start_frame, sl.fps), smpte(s.end_frame + 1, sl.fps)
        lines.append(f"{s.index:03d}  AX       V     C        {tc_in} {tc_out} {tc_in} {tc_out}")
        lines.append(f"* FROM CLIP NAME: {_one_line(Path(sl.video).name)}")
        if s.description:
            lines.append(f"* COMMENT: {_one_line(s.description)[:200]}")
        lines.append("")
    return "\n".join(lines)


def _ffmeta_escape(text: str) -> str:
    """One line (a title never needs two), then FFmpeg's escapes for `\\ = ; #`."""
    text = _one_line(text)
    for ch in "\\=;#":
        text = text.replace(ch, "\\" + ch)
    return text


def to_ffmetadata(sl: SceneList) -> str:
    lines = [";FFMETADATA1", f"title={_ffmeta_escape(Path(sl.video).name)}", ""]
    for s in sl.scenes:
        start, end = round(s.start * 1000), round(s.end * 1000)
        lines += [
            "[CHAPTER]",
            "TIMEBASE=1/1000",
            f"START={start}",
            f"END={end}",
            f"title={_ffmeta_escape(s.title)}",
            "",
        ]
    return "\n".join(lines)


WRITERS: dict[str, Callable[[SceneList], str]] = {
    "json": to_json,
    "jsonl": to_jsonl,
    "csv": to_csv,
    "srt": to_srt,
    "vtt": to_vtt,
    "md": to_md,
    "edl": to_edl,
    "chapters": to_chapters,
    "ffmetadata": to_ffmetadata,
}
FORMATS = tuple(WRITERS)


def render(sl: SceneList, fmt: str) -> str:
    return WRITERS[fmt](sl)


def render_many(lists: list[SceneList], fmt: str) -> str:
    """Several videos in one output: a JSON array for json, concatenation otherwise."""
    if fmt == "json" and len(lists) > 1:
        return json.dumps([json.loads(to_json(sl)) for sl in lists], indent=2, ensure_ascii=False) + "\n"
    return "".join(render(sl, fmt) for sl in lists)
