"""11. Every writer escapes what its format needs: any description and any video name (arrows,
line breaks of every kind, pipes, backticks, comment openers, JSON's raw separators) leave each
format's structure intact, read back by the rule its readers use."""

from __future__ import annotations

import csv
import io
import json
import re

from hypothesis import given, settings
from hypothesis import strategies as st

from kimivl_cli.tasks.video_scenes.formats import FORMATS, render
from kimivl_cli.tasks.video_scenes.timeline import SceneList, scenes_from_starts

FPS = 25.0
TIMING = {
    "srt": re.compile(r"\d\d:\d\d:\d\d,\d{3} --> \d\d:\d\d:\d\d,\d{3}"),
    "vtt": re.compile(r"\d\d:\d\d:\d\d\.\d{3} --> \d\d:\d\d:\d\d\.\d{3}"),
}
LINE_BREAKS = "\r\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029"  # what `str.splitlines` splits on besides \n
NASTY_PIECES = [
    "-->", "--->", "->", "\n", "\r\n", "\r", "\u2028", "\x85", "|", "\\", "\\|", "`", "```", "<!--", "<b>", "&",
    "#", "=", ";", "* COMMENT:", "001  AX", "[CHAPTER]", "WEBVTT", "\n\n", " ", "é", "😀",
]  # fmt: skip
NASTY = st.sampled_from(NASTY_PIECES)
TEXT = st.lists(st.one_of(NASTY, st.text(max_size=6)), max_size=8).map("".join)


def _scene_list(name: str, descriptions: list[str]) -> SceneList:
    starts = [0, 30, 76][: len(descriptions)]
    return SceneList(f"clips/{name}.mp4", FPS, 100, scenes_from_starts(starts, 100, FPS, descriptions))


def _cues(text: str, fmt: str) -> list[list[str]]:
    body = text.removeprefix("WEBVTT\n\n") if fmt == "vtt" else text
    return [block.split("\n") for block in body.rstrip("\n").split("\n\n")]


def check_subtitles(text: str, sl: SceneList, fmt: str) -> None:
    cues = _cues(text, fmt)
    assert len(cues) == len(sl.scenes)
    for cue, scene in zip(cues, sl.scenes, strict=True):
        assert cue[0] == str(scene.index) and TIMING[fmt].fullmatch(cue[1]), cue
        assert len(cue) > 2 and all(line and "-->" not in line for line in cue[2:]), cue
        if fmt == "vtt":
            assert "<" not in "".join(cue[2:]) and not re.search(r"&(?!amp;|lt;)", "".join(cue[2:])), cue


def check_markdown(text: str, sl: SceneList) -> None:
    lines = text.split("\n")
    assert lines[0].startswith("# Scenes of ") and not re.search(r"(?<!\\)<", lines[0])
    rows = [line for line in lines if line.startswith("| ") and line[2].isdigit()]
    assert len(rows) == len(sl.scenes)
    for row in rows:
        unescaped = re.sub(r"\\.", "", row)  # what a GFM table reader splits on: pipes not escaped
        assert unescaped.count("|") == 6 and "<" not in unescaped, row
    fence_at = next(i for i, line in enumerate(lines) if line.startswith("```") and line.endswith("text"))
    fence = lines[fence_at].removesuffix("text")
    closing = lines.index(fence, fence_at + 1)
    assert closing - fence_at - 1 == len(sl.scenes)  # one chapter line each; nothing closed the fence early


def check_edl(text: str, sl: SceneList) -> None:
    lines = text.split("\n")
    assert lines[0].startswith("TITLE: ") and lines[1] == "FCM: NON-DROP FRAME"
    events = [line for line in lines if re.match(r"\d{3} ", line)]
    assert len(events) == len(sl.scenes)
    assert all(line == "" or line.startswith(("* FROM CLIP NAME: ", "* COMMENT: ")) or line in events
               for line in lines[2:])  # fmt: skip


def check_ffmetadata(text: str, sl: SceneList) -> None:
    lines = text.split("\n")
    assert lines[0] == ";FFMETADATA1" and lines.count("[CHAPTER]") == len(sl.scenes)
    for line in lines[1:]:
        assert line in ("", "[CHAPTER]") or re.fullmatch(r"[A-Za-z]+=(?:[^\\=;#]|\\[\\=;#])*", line), line


def check_chapters(text: str, sl: SceneList) -> None:
    if text.startswith(";FFMETADATA1"):
        check_ffmetadata(text, sl)
    else:  # YouTube's: one "m:ss title" line per scene
        lines = text.rstrip("\n").split("\n")
        assert len(lines) == len(sl.scenes) and all(re.match(r"\d+:\d\d ", line) for line in lines)


def check_json(text: str, sl: SceneList) -> None:
    doc = json.loads(text)
    assert doc["video"] == sl.video and [s["description"] for s in doc["scenes"]] == [s.description for s in sl.scenes]


def check_jsonl(text: str, sl: SceneList) -> None:
    lines = text.splitlines()  # the most eager line splitter there is
    assert len(lines) == len(sl.scenes)
    assert [json.loads(line)["description"] for line in lines] == [s.description for s in sl.scenes]


def check_csv(text: str, sl: SceneList) -> None:
    rows = list(csv.reader(io.StringIO(text)))
    assert len(rows) == 2 + len(sl.scenes)
    assert [row[0] for row in rows[2:]] == [str(s.index) for s in sl.scenes]


CHECKS = {
    "srt": lambda text, sl: check_subtitles(text, sl, "srt"),
    "vtt": lambda text, sl: check_subtitles(text, sl, "vtt"),
    "md": check_markdown,
    "edl": check_edl,
    "chapters": check_chapters,
    "ffmetadata": check_ffmetadata,
    "json": check_json,
    "jsonl": check_jsonl,
    "csv": check_csv,
}


def test_every_format_has_a_structural_check() -> None:
    assert set(FORMATS) <= set(CHECKS)


@settings(max_examples=150, deadline=None)
@given(name=TEXT, descriptions=st.lists(TEXT, min_size=1, max_size=3))
def test_any_text_keeps_every_format_whole(name: str, descriptions: list[str]) -> None:
    sl = _scene_list(name.replace("/", "_"), descriptions)
    for fmt in FORMATS:
        text = render(sl, fmt)
        if fmt not in ("json", "csv"):  # those two quote line breaks their own way
            assert not any(ch in text for ch in LINE_BREAKS), (fmt, text)
        CHECKS[fmt](text, sl)


def test_the_issue_examples() -> None:
    sl = _scene_list("talk\n* FROM CLIP NAME: evil\nname", ["a ---> b", "x\n\ny"])
    assert "-->" not in "".join(line for line in render(sl, "srt").split("\n") if not TIMING["srt"].fullmatch(line))
    edl = render(sl, "edl").split("\n")
    assert sum(line.startswith("* FROM CLIP NAME:") for line in edl) == 2  # one per event, none injected
    assert render(sl, "md").split("\n")[0] == "# Scenes of talk * FROM CLIP NAME: evil name.mp4"
