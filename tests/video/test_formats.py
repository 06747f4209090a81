"""Every output format, read back by the parser its users would use."""

from __future__ import annotations

import csv
import io
import itertools
import json
import re

import pytest

from kimivl_cli.media.video import frame_label
from kimivl_cli.tasks.video_scenes.formats import FORMATS, render, render_many
from kimivl_cli.tasks.video_scenes.timeline import SceneList, clock, scenes_from_starts, short_clock, smpte
from kimivl_cli.video.shots import Boundary, shots_from_boundaries

FPS = 25.0


def test_shots_and_scenes_are_cut_by_one_rule() -> None:
    """Unsorted, repeated and out-of-range starts give the same consecutive segments either way."""
    starts = [76, 30, 30, 0, 300, 137]
    shots = shots_from_boundaries([Boundary(f, "cut", 1.0, (f, f)) for f in starts], 250, FPS)
    scenes = scenes_from_starts(starts, 250, FPS)
    expected = [(0, 29, 0, 30), (30, 75, 30, 76), (76, 136, 76, 137), (137, 249, 137, 250)]
    for segments in (shots, scenes):
        assert [(s.start_frame, s.end_frame, s.start * FPS, s.end * FPS) for s in segments] == expected
    assert [s.boundary.frame if s.boundary else None for s in shots] == [None, 30, 76, 137]


@pytest.fixture
def scene_list() -> SceneList:
    texts = ["A rider jumps.", "Close-up, a -->\n\nsecond line | pipe", "", "Crowd = cheers; #1", "", "End"]
    return SceneList("clips/bikes.mp4", FPS, 250, scenes_from_starts([0, 30, 76, 137, 187, 242], 250, FPS, texts))


def test_timecodes() -> None:
    assert clock(83.4) == "00:01:23.400"
    assert clock(3599.9996) == "01:00:00.000"
    assert clock(1.2, comma=True) == "00:00:01,200"
    assert frame_label(83.44) == "[00:01:23.4]"
    assert short_clock(83.9) == "1:23" and short_clock(3723) == "1:02:03"
    assert smpte(30, 25) == "00:00:01:05" and smpte(90000, 25) == "01:00:00:00"


def test_json_schema(scene_list: SceneList) -> None:
    doc = json.loads(render(scene_list, "json"))
    assert set(doc) == {"video", "fps", "frames", "scenes"}
    first, second = doc["scenes"][:2]
    assert set(first) == {"index", "start_frame", "end_frame", "start", "end", "description"}
    assert (first["start_frame"], first["end_frame"], first["end"]) == (0, 29, 1.2)
    assert (second["start_frame"], second["start"]) == (30, 1.2)
    assert doc["scenes"][-1]["end_frame"] == 249 and doc["scenes"][-1]["end"] == 10.0
    both = json.loads(render_many([scene_list, scene_list], "json"))
    assert isinstance(both, list) and len(both) == 2


def test_jsonl(scene_list: SceneList) -> None:
    rows = [json.loads(line) for line in render(scene_list, "jsonl").splitlines()]
    assert [r["index"] for r in rows] == [1, 2, 3, 4, 5, 6] and rows[0]["video"] == "clips/bikes.mp4"


def test_csv_in_pyscenedetect_layout(scene_list: SceneList) -> None:
    rows = list(csv.reader(io.StringIO(render(scene_list, "csv"))))
    assert rows[0] == ["Timecode List:", "00:00:01.200", "00:00:03.040", "00:00:05.480", "00:00:07.480", "00:00:09.680"]
    assert rows[1][:5] == ["Scene Number", "Start Frame", "Start Timecode", "Start Time (seconds)", "End Frame"]
    assert len(rows[1]) == 11 and rows[1][-1] == "Description"  # PySceneDetect's ten, then ours
    # PySceneDetect writes 1-based start frames and the exclusive 0-based end (= inclusive 1-based).
    assert rows[2][:10] == [
        "1",
        "1",
        "00:00:00.000",
        "0.000",
        "30",
        "00:00:01.200",
        "1.200",
        "30",
        "00:00:01.200",
        "1.200",
    ]
    assert [row[10] for row in rows[2:5]] == ["A rider jumps.", "Close-up, a --> second line | pipe", ""]
    assert rows[-1] == [
        "6",
        "243",
        "00:00:09.680",
        "9.680",
        "250",
        "00:00:10.000",
        "10.000",
        "8",
        "00:00:00.320",
        "0.320",
        "End",
    ]


def test_csv_matches_pyscenedetect_writer(scene_list: SceneList) -> None:
    scenedetect = pytest.importorskip("scenedetect")
    from scenedetect.scene_manager import write_scene_list

    starts = [s.start_frame for s in scene_list.scenes]
    tc = [scenedetect.FrameTimecode(f, FPS) for f in [*starts, 250]]
    theirs = io.StringIO()
    write_scene_list(theirs, list(itertools.pairwise(tc)), include_cut_list=False)
    rows = list(csv.reader(io.StringIO(render(scene_list, "csv").split("\n", 1)[1])))
    ours = io.StringIO()
    csv.writer(ours, lineterminator="\n").writerows(row[:10] for row in rows)  # without our Description
    assert ours.getvalue() == theirs.getvalue()


def _cues(text: str, comma: bool) -> list[tuple[float, float, str]]:
    sep = "," if comma else r"\."
    pattern = rf"^(\d\d):(\d\d):(\d\d){sep}(\d\d\d) --> (\d\d):(\d\d):(\d\d){sep}(\d\d\d)$"
    cues = []
    for block in text.strip().split("\n\n"):
        lines = block.split("\n")
        if lines == ["WEBVTT"]:
            continue
        assert lines[0].isdigit(), block
        m = re.match(pattern, lines[1])
        assert m, lines[1]
        g = [int(x) for x in m.groups()]
        start = g[0] * 3600 + g[1] * 60 + g[2] + g[3] / 1000
        end = g[4] * 3600 + g[5] * 60 + g[6] + g[7] / 1000
        assert len(lines) >= 3 and all(line.strip() and "-->" not in line for line in lines[2:])
        cues.append((start, end, "\n".join(lines[2:])))
    return cues


@pytest.mark.parametrize("fmt", ["srt", "vtt"])
def test_subtitles_have_valid_cue_timing(scene_list: SceneList, fmt: str) -> None:
    text = render(scene_list, fmt)
    assert text.startswith("WEBVTT\n\n") == (fmt == "vtt")
    cues = _cues(text, comma=fmt == "srt")
    assert len(cues) == 6
    for (s, e, _), (s2, _, _) in itertools.pairwise(cues):
        assert s < e <= s2
    assert cues[0][0] == 0.0 and cues[-1][1] == 10.0
    assert cues[2][2] == "Scene 3" and cues[1][2] == "Close-up, a ->\nsecond line | pipe"


def _parse_edl(text: str, fps: int) -> list[dict]:
    """A minimal CMX3600 reader: title, FCM, events with four timecodes."""
    lines = text.splitlines()
    assert lines[0].startswith("TITLE: ") and lines[1] == "FCM: NON-DROP FRAME"
    to_frames = lambda tc: ((int(tc[0:2]) * 60 + int(tc[3:5])) * 60 + int(tc[6:8])) * fps + int(tc[9:11])  # noqa: E731
    events = []
    for line in lines[2:]:
        if not line or line.startswith("*"):
            continue
        num, reel, track, trans, *tcs = line.split()
        assert len(num) == 3 and reel == "AX" and track == "V" and trans == "C" and len(tcs) == 4
        assert all(re.fullmatch(r"\d\d:\d\d:\d\d:\d\d", tc) for tc in tcs)
        events.append({"num": int(num), "src": tuple(map(to_frames, tcs[:2])), "rec": tuple(map(to_frames, tcs[2:]))})
    return events


def test_edl_cmx3600(scene_list: SceneList) -> None:
    events = _parse_edl(render(scene_list, "edl"), 25)
    assert [e["num"] for e in events] == [1, 2, 3, 4, 5, 6]
    assert [e["src"] for e in events] == [(0, 30), (30, 76), (76, 137), (137, 187), (187, 242), (242, 250)]
    assert all(e["src"] == e["rec"] for e in events)


def test_chapters_youtube_list(scene_list: SceneList) -> None:
    lines = render(scene_list, "chapters").splitlines()
    assert lines[:3] == ["0:00 A rider jumps.", "0:01 Close-up, a -->", "0:03 Scene 3"]
    assert len(lines) == 6 and lines[-1] == "0:09 End"
    assert lines == render(scene_list, "md").split("```text\n")[1].split("\n```")[0].splitlines()


def test_ffmetadata_chapters(scene_list: SceneList) -> None:
    text = render(scene_list, "ffmetadata")
    assert text.startswith(";FFMETADATA1\n")
    chapters = re.findall(r"\[CHAPTER\]\nTIMEBASE=1/1000\nSTART=(\d+)\nEND=(\d+)\ntitle=(.*)", text)
    assert [(int(a), int(b)) for a, b, _ in chapters][:2] == [(0, 1200), (1200, 3040)]
    assert chapters[3][2] == r"Crowd \= cheers\; \#1"


def test_markdown_table_and_youtube_list(scene_list: SceneList) -> None:
    text = render(scene_list, "md")
    rows = [line for line in text.splitlines() if line.startswith("| ") and line[2].isdigit()]
    assert len(rows) == 6 and rows[1].count(" | ") == 4  # the pipe in the description is escaped
    block = text.split("```text\n")[1].split("```")[0].splitlines()
    assert block[0] == "0:00 A rider jumps." and block[2] == "0:03 Scene 3"


def test_every_format_renders(scene_list: SceneList) -> None:
    for fmt in FORMATS:
        assert render(scene_list, fmt).strip()
