"""The chat state without a model: commands, attachments, history without earlier thinking, /save."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from kimivl_cli.errors import InputError
from kimivl_cli.processor.chat import chat_images
from kimivl_cli.processor.image import ImageProcessorConfig
from kimivl_cli.tasks.chat import Command, Conversation, Reply, parse_command, run_command

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "examples" / "chart.png"
NOTES = ROOT / "examples" / "notes.pdf"


def test_parse_command() -> None:
    assert parse_command("what is this?") is None
    assert parse_command('/image "my photo.png" b.png') == Command("image", ("my photo.png", "b.png"))
    assert parse_command("/save! out.json") == Command("save!", ("out.json",))
    with pytest.raises(InputError, match="unknown command /frobnicate"):
        parse_command("/frobnicate")
    with pytest.raises(InputError, match="No closing quotation"):
        parse_command('/image "unclosed')


def test_commands_run_on_the_conversation_and_reply_to_the_view() -> None:
    chat = Conversation(None, ImageProcessorConfig.official())

    def run(line: str) -> Reply:
        command = parse_command(line)
        assert command is not None
        return run_command(chat, command, "tiny")

    assert run("/thinking off") == Reply("thinking hidden", show_thinking=False)
    assert run("/help") == Reply(show_help=True) and run("/quit") == run("/exit") == Reply(leave=True)
    assert "1 image" in run(f"/image {CHART}").note and len(chat.pending) == 1
    assert run("/reset") == Reply("conversation cleared") and chat.pending == []
    for line, usage in (
        ("/pdf", "/pdf PATH"),
        ("/save", "/save FILE"),
        ("/save! a b", "/save! FILE"),
        ("/thinking", "on|off"),
    ):
        with pytest.raises(InputError, match=usage):
            run(line)


def test_turns_carry_attachments_and_history_loses_its_thinking() -> None:
    chat = Conversation("Be brief.", ImageProcessorConfig.official())
    note = chat.attach([str(CHART)])
    assert "1 image" in note and str(CHART) in note
    messages, images = chat.request("What is it?")
    assert [m["role"] for m in messages] == ["system", "user"] and len(images) == 1
    chat.commit("What is it?", "It looks like bars.", "A bar chart.")
    assert chat.pending == [] and chat.history[-1]["content"] == "◁think▷It looks like bars.◁/think▷A bar chart."

    chat.attach([str(NOTES)], pages="1")
    messages, images = chat.request("And this?")
    assert [m["role"] for m in messages] == ["system", "user", "assistant", "user"]
    assert messages[2]["content"] == "A bar chart."  # earlier thinking is not sent again
    assert len(images) == 2 == len(chat_images(messages))  # the first image is sent again (cached by the engine)
    assert messages[3]["content"][0] == {"type": "text", "text": "notes.pdf, page 1:\n"}


def test_save_refuses_to_overwrite_unless_forced(tmp_path: Path) -> None:
    chat = Conversation(None, ImageProcessorConfig.official())
    chat.pending = [Image.new("RGB", (56, 56))]
    chat.pending_names = ["dot.png"]
    chat.commit("Hi", "", "Hello!")
    path = chat.save(tmp_path / "t.json", "tiny")
    data = json.loads(path.read_text())
    assert data == {
        "model": "tiny",
        "system": None,
        "turns": [
            {"role": "user", "text": "Hi", "images": 1, "attachments": ["dot.png"]},
            {"role": "assistant", "text": "Hello!", "thinking": ""},
        ],
    }
    with pytest.raises(InputError, match="exists") as refused:
        chat.save(path, "tiny")
    assert "/save!" in refused.value.one_line()
    chat.reset()
    chat.save(path, "tiny", overwrite=True)
    assert json.loads(path.read_text())["turns"] == []


def test_the_saved_transcript_splits_a_reply_as_it_was_streamed() -> None:
    """An answer that quotes the end marker keeps it; the reasoning stays the reasoning."""
    chat = Conversation(None, ImageProcessorConfig.official())
    chat.commit("Which marker ends thinking?", "The model's own.", "It is ◁/think▷, as written.")
    assert chat.to_json("tiny")["turns"][-1] == {
        "role": "assistant",
        "text": "It is ◁/think▷, as written.",
        "thinking": "The model's own.",
    }


def test_bad_attachments_leave_the_pending_list_alone(tmp_path: Path) -> None:
    chat = Conversation(None, ImageProcessorConfig.official())
    with pytest.raises(InputError, match="no such file"):
        chat.attach([str(CHART), str(tmp_path / "missing.png")])
    with pytest.raises(InputError, match="nothing to attach"):
        chat.attach([])
    assert chat.pending == [] and chat.pending_names == []
    chat.attach([str(CHART)])
    assert chat.drop_pending() == [str(CHART)] and chat.pending == []
