"""The model side of video-scenes without a model: chat messages and `--verify-shots` with a fake `Describe`."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import pytest
from PIL import Image

from kimivl_cli.backends import AnswerOnly
from kimivl_cli.errors import KimivlError
from kimivl_cli.tasks.backend import open_backend
from kimivl_cli.tasks.video_scenes.describe import chat_messages, describe_with
from kimivl_cli.tasks.video_scenes.pipeline import VideoScenesOptions, video_scenes
from kimivl_cli.tasks.video_scenes.scenes import TimedFrame, scenes_prompt
from kimivl_cli.video.shots import Boundary, Candidate, ShotList, shots_from_boundaries, with_confirmed


def test_each_label_comes_right_before_its_image() -> None:
    frames = [TimedFrame(i, f"[00:00:0{i}.0]", float(i), Image.new("RGB", (8, 8))) for i in range(3)]
    (turn,) = chat_messages(frames, "Which scenes?")
    kinds = [item["type"] for item in turn["content"]]
    assert turn["role"] == "user" and kinds == ["text", "image"] * 3 + ["text"]
    assert [item["text"] for item in turn["content"][0:6:2]] == ["[00:00:00.0]\n", "[00:00:01.0]\n", "[00:00:02.0]\n"]
    assert turn["content"][-1]["text"] == "Which scenes?"


def test_confirmed_candidates_yield_to_detected_boundaries() -> None:
    detected = [Boundary(40, "cut", 0.9, (40, 40))]
    shots = ShotList("v", 25.0, 100, shots_from_boundaries(detected, 100, 25.0), detected, [])
    near, far = Candidate(45, "gradual", 0.3, (42, 48), "weak"), Candidate(70, "flash", 0.6, (70, 71), "flash")
    checked = with_confirmed(shots, [near, far], min_len=15)
    assert [(b.frame, b.kind) for b in checked.boundaries] == [(40, "cut"), (70, "cut")]
    assert [s.start_frame for s in checked.shots] == [0, 40, 70] and checked.shots[-1].end_frame == 99


def test_verify_shots_asks_about_the_flash(synthetic_clip: Path, tmp_path: Path) -> None:
    """The synthetic flash (frames 20-21) is an uncertain candidate: the model's yes/no decides."""
    calls: list[tuple[list[int], str]] = []

    def describe(answer: str):
        def run(frames: Sequence[TimedFrame], prompt: str, json_format=None) -> str:
            calls.append(([f.frame for f in frames], prompt))
            return answer if "yes or no" in prompt else "no scenes here"

        return run

    options = VideoScenesOptions(max_frames=4, verify_shots=True)
    kept = video_scenes(synthetic_clip, options, describe("No, a flash."))
    questions = [frames for frames, prompt in calls if "yes or no" in prompt]
    assert questions and all(len(frames) >= 2 for frames in questions)
    assert all(min(frames) < 20 and max(frames) > 21 for frames in questions[:1])
    assert "[00:00:00.8]" in calls[0][1] and "$" not in calls[0][1]
    assert [s.start_frame for s in kept.scenes.scenes] == [0, 40, 75, 118]
    assert any("confirmed 0 of" in w for w in kept.scenes.warnings)

    calls.clear()
    split = video_scenes(synthetic_clip, options, describe("Yes."))
    assert [s.start_frame for s in split.scenes.scenes] == [0, 20, 40, 75, 118]
    assert any("confirmed 2 of 2" in w and "(1 added)" in w for w in split.scenes.warnings)
    # the scene prompt saw the confirmed shot too
    assert scenes_prompt(split.shots.shots, 4).split("\n\n")[1] in calls[-1][1]


def test_prompt_file_replaces_the_scene_prompt(bikes_mp4: Path, tmp_path: Path) -> None:
    custom = tmp_path / "mine.md"
    custom.write_text("Custom: $count frames, $unknown stays.")
    seen: list[str] = []
    options = VideoScenesOptions(max_frames=2, prompt_file=custom)
    video_scenes(bikes_mp4, options, lambda frames, prompt, fmt: seen.append((prompt, fmt)) or "")
    assert seen == [("Custom: 2 frames, $unknown stays.", None)]  # the user's prompt decides the format


def test_engine_opens_on_first_call_and_bad_models_are_user_errors() -> None:
    describe = describe_with(AnswerOnly(open_backend("local", "/no/such/checkpoint", "cpu")))  # loads nothing yet
    with pytest.raises(KimivlError) as failed:
        describe([], "prompt")
    assert failed.value.exit_code == 2 and "/no/such/checkpoint" in failed.value.one_line()
