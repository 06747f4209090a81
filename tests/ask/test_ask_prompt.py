"""Building the user turn without a model: question parsing, timestamps, inputs -> items, page fitting."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from kimivl_cli.cli.flags import error_line
from kimivl_cli.errors import InputError
from kimivl_cli.media import video as media_video
from kimivl_cli.media.inputs import as_input
from kimivl_cli.media.video import Frame, frame_label
from kimivl_cli.processor.chat import chat_images
from kimivl_cli.processor.image import ImageProcessorConfig, image_token_count
from kimivl_cli.processor.tokenizer import Tokenizer
from kimivl_cli.tasks.ask import Budget, MediaOptions, build_prompt, read_inputs, resolve, split_question
from kimivl_cli.tasks.video_scenes import scenes

CFG = ImageProcessorConfig.official()


@pytest.fixture(scope="module")
def tokenizer(tiny_checkpoint: Path) -> Tokenizer:
    return Tokenizer.from_dir(tiny_checkpoint)


def _no_stdin() -> bytes:
    raise AssertionError("stdin must not be read")


def test_question_is_the_last_argument(tmp_path: Path) -> None:
    image = tmp_path / "a.png"
    image.write_bytes(b"x")
    assert split_question([str(image), "What is it?"], False, _no_stdin) == ([str(image)], "What is it?")
    assert split_question(["-", "Transcribe"], False, _no_stdin) == (["-"], "Transcribe")


def test_question_from_stdin_when_every_argument_is_a_file(tmp_path: Path) -> None:
    image = tmp_path / "a.png"
    image.write_bytes(b"x")
    assert split_question([str(image)], False, lambda: b"  Why?\n") == ([str(image)], "Why?")
    with pytest.raises(InputError, match="stdin is empty"):
        split_question([str(image)], False, lambda: b"")
    with pytest.raises(InputError, match="no question"):
        split_question([], False, _no_stdin)
    with pytest.raises(InputError, match="last argument '-'"):
        split_question(["-"], False, _no_stdin)
    with pytest.raises(InputError, match="is a file"):
        split_question([str(image)], True, _no_stdin)  # stdin is a terminal: nothing to read
    with pytest.raises(InputError, match="is a file"):
        split_question(["-", str(image)], False, _no_stdin)  # stdin holds an input


@pytest.mark.parametrize(
    ("seconds", "text"),
    [(0, "[00:00:00.0]"), (83.46, "[00:01:23.4]"), (3600 * 2 + 59.99, "[02:00:59.9]"), (0.3, "[00:00:00.3]")],
)
def test_timestamp(seconds: float, text: str) -> None:
    assert frame_label(seconds) == text


class _FramesAt:
    """A stand-in `VideoFile` whose frames sit at the given presentation times."""

    def __init__(self, times: list[float]) -> None:
        pixels = np.zeros((4, 4, 3), np.uint8)
        self.frames = [Frame(i, t, pixels) for i, t in enumerate(times)]
        self.frame_count, self.duration = len(times), times[-1]

    def __call__(self, _path: object) -> _FramesAt:
        return self

    def __enter__(self) -> _FramesAt:
        return self

    def __exit__(self, *exc: object) -> None:
        pass

    def sample(self, count: int) -> list[Frame]:
        return self.frames[:count]

    def read(self, indices: list[int], max_side: int | None = None) -> list[Frame]:
        return [self.frames[i] for i in indices]


def test_ask_and_video_scenes_label_a_frame_identically(bikes_mp4: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Both put the same marker before a frame at 83.46 s and at 59.97 s (floored to the tenth)."""
    video = _FramesAt([59.97, 83.46])
    monkeypatch.setattr(media_video, "VideoFile", video)
    monkeypatch.setattr(scenes, "VideoFile", video)
    with read_inputs([as_input(str(bikes_mp4))], MediaOptions(frames=2), CFG) as (segments, _notes):
        ask_labels = [seg.strip() for seg in segments if isinstance(seg, str)]
    keyframes = [scenes.Keyframe(0, 59.97, 0), scenes.Keyframe(1, 83.46, 0)]
    scene_labels = [f.label for f in scenes.read_keyframes(bikes_mp4, keyframes)]
    assert ask_labels == scene_labels == ["[00:00:59.9]", "[00:01:23.4]"]


def test_video_frames_follow_their_timestamps_and_text_is_inlined(
    bikes_mp4: Path, tmp_path: Path, tokenizer: Tokenizer
) -> None:
    notes = tmp_path / "notes.txt"
    notes.write_text("Rider numbers: 7 and 12.")
    budget = Budget(131072, 16)
    with read_inputs(resolve([str(bikes_mp4), str(notes)]), MediaOptions(frames=4), CFG) as (segments, _notes):
        prompt = build_prompt(segments, "Who wins?", system=None, tokenizer=tokenizer, image_config=CFG, budget=budget)
    (user,) = prompt.messages
    items = user["content"]
    stamps = [i["text"] for i in items[:-2:2]]
    assert [i["type"] for i in items[1:-2:2]] == ["image"] * 4
    assert stamps == ["[00:00:01.2]\n", "[00:00:03.7]\n", "[00:00:06.2]\n", "[00:00:08.7]\n"]  # 250 frames at 25 fps
    assert items[-2]["text"].endswith("notes.txt:\nRider numbers: 7 and 12.\n\n") and items[-1]["text"] == "Who wins?"
    assert len(prompt.images) == 4 and prompt.notes == []


def test_long_pdf_is_cut_to_the_relevant_pages_and_fits(libtasn1_pdf: Path, tokenizer: Tokenizer) -> None:
    question = "What does asn1_der_decoding_element return?"
    budget = Budget(2048, 8, "--max-context 2,048")
    with read_inputs(resolve([str(libtasn1_pdf)]), MediaOptions(), CFG) as (segments, _notes):
        prompt = build_prompt(
            segments, question, system="Be brief.", tokenizer=tokenizer, image_config=CFG, budget=budget
        )
    from kimivl_cli.tasks.ask import text_tokens

    tokens = [image_token_count(im.width, im.height, CFG) for im in prompt.images]
    assert 2 <= len(prompt.images) < 36
    assert text_tokens(prompt.messages, tokenizer) + sum(tokens) + budget.reserve <= budget.limit
    assert len(chat_images(prompt.messages)) == len(prompt.images)
    labels = [i["text"] for i in prompt.messages[1]["content"] if i.get("type") == "text"][:-1]
    pages = [int(label.split("page ")[1].rstrip(":\n")) for label in labels]
    assert pages == sorted(pages)
    assert f"sending {len(pages)} of 36 pages" in prompt.notes[0] and "BM25" in prompt.notes[0]
    assert "--max-context 2,048" in prompt.notes[0]


def test_page_range_at_natural_size_and_a_context_too_small(libtasn1_pdf: Path, tokenizer: Tokenizer) -> None:
    with read_inputs(resolve([str(libtasn1_pdf)]), MediaOptions(pages="2-3"), CFG) as (segments, _notes):
        prompt = build_prompt(
            segments, "Summarise", system=None, tokenizer=tokenizer, image_config=CFG, budget=Budget(131072, 512)
        )
        assert [im.size for im in prompt.images] == [(1224, 1584)] * 2 and prompt.notes == []
        with pytest.raises(InputError, match="no room for any PDF page"):
            build_prompt(
                segments, "Summarise", system=None, tokenizer=tokenizer, image_config=CFG, budget=Budget(300, 8)
            )


def test_images_keep_their_size(tokenizer: Tokenizer) -> None:
    image = Image.new("RGB", (300, 200), "white")
    prompt = build_prompt(
        [image], "Colour?", system=None, tokenizer=tokenizer, image_config=CFG, budget=Budget(4096, 8)
    )
    assert prompt.images == [image] and prompt.messages[0]["content"] == [
        {"type": "image"},
        {"type": "text", "text": "Colour?"},
    ]


def test_frames_and_fps_exclude_each_other() -> None:
    with pytest.raises(InputError) as err:
        MediaOptions(frames=4, fps=1.0)
    assert "--frames and --fps" in error_line(err.value)  # as the CLI says it
