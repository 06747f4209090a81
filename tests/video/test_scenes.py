"""Keyframes, the prompt, and the tolerant parser of model text (never raises, snaps to shots)."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kimivl_cli.media import video as video_module
from kimivl_cli.tasks.video_scenes.pipeline import VideoScenesOptions, video_scenes
from kimivl_cli.tasks.video_scenes.scenes import (
    Keyframe,
    choose_keyframes,
    parse_scenes,
    parse_time,
    parse_verdict,
    read_keyframes,
    scenes_format,
    scenes_prompt,
)
from kimivl_cli.tasks.video_scenes.timeline import Scene
from kimivl_cli.video.shots import shots_from_boundaries

FPS, FRAMES = 25.0, 250
SHOT_STARTS = [0, 30, 76, 137, 187, 242]


@pytest.fixture(scope="module")
def shots():
    from kimivl_cli.video.shots import Boundary

    return shots_from_boundaries([Boundary(f, "cut", 1.0, (f, f)) for f in SHOT_STARTS[1:]], FRAMES, FPS)


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        (83.4, 83.4),
        ("83.4", 83.4),
        ("83.4s", 83.4),
        ("1:23.4", 83.4),
        ("00:01:23.400", 83.4),
        ("00:01:23,400", 83.4),
        ("[00:01:23.4]", 83.4),
        ("00:01:23:10", 83.4),  # SMPTE, frame 10 at 25 fps
        ("frame 2085", 83.4),
        ("#2085", 83.4),
        ("soon", None),
        (-3, None),
        (True, None),
        (None, None),
        ("1:99:00", None),
    ],
)
def test_parse_time(text: object, seconds: float | None) -> None:
    got = parse_time(text, FPS)
    assert got == (None if seconds is None else pytest.approx(seconds))


def _starts(scenes: list[Scene]) -> list[int]:
    return [s.start_frame for s in scenes]


def test_clean_json_snaps_to_shots(shots) -> None:
    text = '{"scenes": [{"start": "00:00:00.0", "end": "00:00:03.0", "description": "Riders warm up."}, {"start": "00:00:03.1", "end": "00:00:07.5", "description": "Jumps."}, {"start": 7.4, "end": 10, "description": "Crowd."}]}'
    scenes, warnings = parse_scenes(text, shots, FPS, FRAMES)
    assert warnings == []
    assert _starts(scenes) == [0, 76, 187]  # 3.1 s -> shot at 3.04 s, 7.4 s -> 7.48 s
    assert [s.description for s in scenes] == ["Riders warm up.", "Jumps.", "Crowd."]
    assert scenes[-1].end_frame == 249 and scenes[0].end_frame == 75


@pytest.mark.parametrize(
    "text",
    [
        'Sure! Here are the scenes:\n```json\n[{"start": "0:00", "end": "0:05.4", "description": "A"}, {"start": "0:05.5", "end": "0:10", "description": "B"}]\n```\nHope this helps.',
        '◁think▷Let me look {"start": 99}◁/think▷[{"start_time": "00:00:00.000", "desc": "A"}, {"start_time": "00:00:05.480", "desc": "B"}] and more text',
        '{"scenes": [{"start": 0, "description": "A"}, {"start": 5.48, "description": "B"}, {"start": 8.1, "descr',
        "Scene 1: 00:00:00.0 - 00:00:05.4: A\nScene 2: 00:00:05.5 - 00:00:10.0: B",
        '{"scenes": [{"start_frame": 0, "end_frame": 136, "description": "A"}, {"start_frame": 137, "end_frame": 249, "description": "B"}]}',
    ],
)
def test_tolerant_formats(shots, text: str) -> None:
    scenes, warnings = parse_scenes(text, shots, FPS, FRAMES)
    assert warnings == []
    assert _starts(scenes)[:2] == [0, 137]
    assert scenes[0].description == "A" and scenes[1].description == "B"


@pytest.mark.parametrize("text", ["", "I cannot help with that.", "{not json", '{"scenes": []}', "[1, 2, 3]"])
def test_garbage_falls_back_to_shots(shots, text: str) -> None:
    scenes, warnings = parse_scenes(text, shots, FPS, FRAMES)
    assert _starts(scenes) == SHOT_STARTS and len(warnings) == 1


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.sampled_from([*'{}[]":,0123456789.sa-: \n`', "json", '"start"', '"end"', '"description"'])).map("".join)
)
def test_parser_never_raises_and_always_covers_the_video(shots, text: str) -> None:
    scenes, _ = parse_scenes(text, shots, FPS, FRAMES)
    assert scenes[0].start_frame == 0 and scenes[-1].end_frame == FRAMES - 1
    assert all(a.end_frame + 1 == b.start_frame for a, b in itertools.pairwise(scenes))
    assert {s.start_frame for s in scenes} <= set(SHOT_STARTS)


@settings(max_examples=100, deadline=None)
@given(st.text())
def test_parser_never_raises_on_any_text(shots, text: str) -> None:
    scenes, _ = parse_scenes(text, shots, FPS, FRAMES)
    assert scenes


def test_keyframes_within_and_across_shots(shots) -> None:
    keys = choose_keyframes(shots, FPS, max_frames=12, sample_fps=1.0)
    assert len(keys) == 10  # 10 s at 1 frame/s
    assert {k.shot for k in keys} == set(range(6))  # every shot is seen
    assert all(shots[k.shot].start_frame <= k.frame <= shots[k.shot].end_frame for k in keys)
    assert keys[0].label == f"[00:00:{keys[0].seconds:04.1f}]"
    few = choose_keyframes(shots, FPS, max_frames=3, sample_fps=1.0)
    assert [k.shot for k in few] == [0, 2, 5]  # more shots than frames: evenly spaced shots, first and last kept
    assert [k.frame for k in few] == [(s.start_frame + s.end_frame + 1) // 2 for s in (shots[0], shots[2], shots[5])]


def test_prompt_lists_shots(shots) -> None:
    prompt = scenes_prompt(shots, 10)
    assert "[00:00:01.2] - [00:00:03.0]" in prompt and "10 frames" in prompt and "$" not in prompt


def test_verdict() -> None:
    assert parse_verdict("Yes, it is a cut.") is True
    assert parse_verdict("◁think▷yes or no?◁/think▷No.") is False
    assert parse_verdict("Hard to say") is None


def test_pipeline_with_a_fake_model(bikes_mp4: Path) -> None:
    seen: dict = {}

    def describe(frames, prompt: str, json_format) -> str:
        seen["frames"], seen["prompt"], seen["format"] = frames, prompt, json_format
        return '{"scenes": [{"start": "00:00:00.0", "description": "Intro"}, {"start": "00:00:05.5", "description": "Race"}]}'

    result = video_scenes(bikes_mp4, VideoScenesOptions(max_frames=8), describe)
    assert len(seen["frames"]) == 8 and seen["frames"][0].label.startswith("[00:00:")
    assert max(seen["frames"][0].image.size) <= 896
    assert [(s.start_frame, s.description) for s in result.scenes.scenes] == [(0, "Intro"), (137, "Race")]
    assert seen["format"] == scenes_format(result.shots.shots)  # held to the JSON the prompt asks for
    assert seen["format"].schema["properties"]["scenes"]["items"]["properties"]["start"]["enum"][:2] == [
        "00:00:00.0",
        "00:00:01.2",
    ]  # scenes start where shots do

    garbage = video_scenes(bikes_mp4, VideoScenesOptions(max_frames=4), lambda frames, prompt, fmt: "lorem ipsum")
    assert [s.start_frame for s in garbage.scenes.scenes] == SHOT_STARTS and garbage.scenes.warnings


def test_read_keyframes_decodes_only_those(bikes_mp4: Path, shots) -> None:
    keys = choose_keyframes(shots, FPS, max_frames=3, sample_fps=1.0)
    frames = read_keyframes(bikes_mp4, keys, max_side=64)
    assert [f.seconds for f in frames] == [k.seconds for k in keys] and max(frames[0].image.size) == 64


def test_keyframes_walked_or_sought_are_the_same_frames(bikes_mp4: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    keys = [Keyframe(f, f / FPS, 0) for f in (3, 40, 41, 120, 200, 120, 249)]  # a repeat, neighbours, the last
    walked = read_keyframes(bikes_mp4, keys, max_side=64)
    monkeypatch.setattr(video_module, "SEEK_GAP", 10)
    sought = read_keyframes(bikes_mp4, keys, max_side=64)
    assert [(f.frame, f.label, f.image.tobytes()) for f in sought] == [
        (f.frame, f.label, f.image.tobytes()) for f in walked
    ]
    assert [f.frame for f in walked] == [3, 40, 41, 120, 200, 249]
    assert [f.seconds for f in walked] == pytest.approx([f.frame / FPS for f in walked])


def test_keyframes_past_the_end_are_left_out(bikes_mp4: Path) -> None:
    keys = [Keyframe(f, f / FPS, 0) for f in (10, 249, 250, 900)]
    assert [f.frame for f in read_keyframes(bikes_mp4, keys, max_side=32)] == [10, 249]
