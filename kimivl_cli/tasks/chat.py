"""`kimivl chat`: the conversation behind the REPL, and its slash commands.

`Conversation` holds the history in `processor.chat` form (assistant turns keep their
`◁think▷...◁/think▷` so `/save` has everything) and the images in prompt order. Each request
sends the history through `strip_history_thinking`, as the official demo does, plus every
earlier image again: the engine's feature cache recognises them by content, so only new
images run the vision tower. Attachments (`/image`, `/pdf`, the command's INPUTs) wait in
`pending` until the next question. No I/O here besides reading inputs and writing `/save`.
"""

from __future__ import annotations

import json
import shlex
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from PIL import Image

from kimivl_cli.engine.stream import split_thinking
from kimivl_cli.errors import InputError
from kimivl_cli.processor.chat import THINK_END, THINK_START, strip_history_thinking
from kimivl_cli.tasks.ask import MediaOptions, PdfPage, Segment, Segments, content_items, resolve

if TYPE_CHECKING:
    from kimivl_cli.processor.image import ImageProcessorConfig

HELP = """\
/image PATH...        attach images (or any input: PDF, video, text) to the next question
/pdf PATH [PAGES]     attach a PDF's pages, e.g. /pdf manual.pdf 3-5
/reset                forget the conversation and pending attachments
/save FILE            write the conversation as JSON (/save! FILE overwrites)
/load FILE            go on from a conversation saved with /save (its text; images are not kept)
/thinking on|off      show or fold the reasoning trace
/help                 this list
/exit                 leave (also Ctrl-D)"""


@dataclass(frozen=True)
class Command:
    name: str
    args: tuple[str, ...]


@dataclass(frozen=True)
class Reply:
    """What a command leaves to the command line: a note, and the view changes it asks for."""

    note: str = ""
    show_thinking: bool | None = None  # /thinking on|off
    show_help: bool = False
    leave: bool = False


def parse_command(line: str) -> Command | None:
    """`/name args...` -> Command (quoted paths allowed); None for a plain question."""
    if not line.startswith("/"):
        return None
    try:
        words = shlex.split(line[1:])
    except ValueError as exc:
        raise InputError(f"cannot read the command: {exc}", "close the quotes around paths") from None
    if not words or words[0] not in HANDLERS:
        name = words[0] if words else ""
        raise InputError(f"unknown command /{name}", "type /help for the list")
    return Command(words[0], tuple(words[1:]))


@dataclass
class Conversation:
    """Chat history, its images, and attachments waiting for the next question."""

    system: str | None
    image_config: ImageProcessorConfig
    options: MediaOptions = field(default_factory=MediaOptions)
    history: list[dict[str, Any]] = field(default_factory=list)
    images: list[Image.Image] = field(default_factory=list)
    pending: list[str | Image.Image] = field(default_factory=list)
    pending_names: list[str] = field(default_factory=list)
    attachments: list[list[str]] = field(default_factory=list)  # per user turn, for /save

    def attach(self, args: list[str] | tuple[str, ...], pages: str | None = None) -> str:
        """Read inputs now (errors surface at once) and keep them for the next question; -> a note."""
        if not args:
            raise InputError("nothing to attach", "give a path, e.g. /image photo.jpg")
        items = resolve(args)
        options = replace(self.options, pages=pages) if pages is not None else self.options
        added: list[str | Image.Image] = []
        with Segments(options, self.image_config) as reader:
            for item in items:
                added += _rendered(reader.read(item))
        self.pending += added
        self.pending_names += [item.name for item in items]
        count = sum(isinstance(a, Image.Image) for a in added)
        names = ", ".join(item.name for item in items)
        return f"attached {names} ({count} image{'s' if count != 1 else ''}) to the next question"

    def request(self, question: str) -> tuple[list[dict[str, Any]], list[Image.Image]]:
        """Messages and images for the engine: stripped history, then the new turn."""
        head = [{"role": "system", "content": self.system}] if self.system else []
        turn = {"role": "user", "content": content_items(self.pending, question)}
        new_images = [a for a in self.pending if isinstance(a, Image.Image)]
        return [*head, *strip_history_thinking(self.history), turn], [*self.images, *new_images]

    def commit(self, question: str, thinking: str, answer: str) -> None:
        """Record a finished (or interrupted) exchange; pending attachments join the history."""
        self.history.append({"role": "user", "content": content_items(self.pending, question)})
        reply = f"{THINK_START}{thinking}{THINK_END}{answer}" if thinking else answer
        self.history.append({"role": "assistant", "content": reply})
        self.images += [a for a in self.pending if isinstance(a, Image.Image)]
        self.attachments.append(self.pending_names)
        self.pending, self.pending_names = [], []

    def drop_pending(self) -> list[str]:
        """Forget the attachments waiting for the next question; -> their names."""
        names = self.pending_names
        self.pending, self.pending_names = [], []
        return names

    def reset(self) -> None:
        self.history, self.images, self.pending, self.pending_names, self.attachments = [], [], [], [], []

    def to_json(self, model: str) -> dict[str, Any]:
        """The transcript: each turn's text (images as placeholders), attachments by name, thinking apart."""
        turns = []
        users = iter(self.attachments)
        for message in self.history:
            if message["role"] == "user":
                items = message["content"]
                text = "".join(i["text"] for i in items if i.get("type") == "text")
                images = sum(i.get("type") == "image" for i in items)
                turns.append({"role": "user", "text": text, "images": images, "attachments": next(users)})
            else:
                thinking, answer = split_thinking(message["content"])
                turns.append({"role": "assistant", "text": answer, "thinking": thinking})
        return {"model": model, "system": self.system, "turns": turns}

    def load(self, path: str | Path) -> str:
        """Replace the conversation by one written by `save`; -> a note. Images are not in the file:
        their turns keep their text and the note says how many were left out."""
        path = Path(path).expanduser()
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            turns = data["turns"]
            pairs = [(turns[i], turns[i + 1]) for i in range(0, len(turns) - 1, 2)]
            history: list[dict[str, Any]] = []
            for user, assistant in pairs:
                if (user["role"], assistant["role"]) != ("user", "assistant"):
                    raise ValueError("turns must alternate user, assistant")
                reply, thinking = str(assistant["text"]), str(assistant.get("thinking") or "")
                history += [
                    {"role": "user", "content": [{"type": "text", "text": str(user["text"])}]},
                    {
                        "role": "assistant",
                        "content": f"{THINK_START}{thinking}{THINK_END}{reply}" if thinking else reply,
                    },
                ]
            attachments = [list(user.get("attachments") or []) for user, _ in pairs]
            dropped = sum(int(user.get("images") or 0) for user, _ in pairs)
        except FileNotFoundError:
            raise InputError(f"{path}: no such file") from None
        except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError, AttributeError) as exc:
            raise InputError(f"{path} is not a conversation saved by /save ({exc})") from None
        self.reset()
        self.history, self.attachments = history, attachments
        if isinstance(data.get("system"), str):
            self.system = data["system"]
        images = (
            f"; its {dropped} image{'s are' if dropped != 1 else ' is'} not restored (attach again)" if dropped else ""
        )
        return f"loaded {len(pairs)} exchange{'s' if len(pairs) != 1 else ''} from {path}{images}"

    def save(self, path: str | Path, model: str, overwrite: bool = False) -> Path:
        """Write the transcript as JSON; an existing file is kept unless `overwrite`."""
        path = Path(path).expanduser()
        data = json.dumps(self.to_json(model), ensure_ascii=False, indent=2) + "\n"
        try:
            with open(path, "w" if overwrite else "x", encoding="utf-8") as fh:
                fh.write(data)
        except FileExistsError:
            raise InputError(f"{path} exists", f"use /save! {path} to overwrite it") from None
        except OSError as exc:
            raise InputError(f"cannot write {path}: {exc.strerror or exc}") from None
        return path


def _rendered(segments: list[Segment]) -> list[str | Image.Image]:
    """Segments with PDF pages rendered now (default resolution), each as its label and image."""
    out: list[str | Image.Image] = []
    for seg in segments:
        if isinstance(seg, PdfPage):
            out += [seg.label, seg.doc.render(seg.index)]
        else:
            out.append(seg)
    return out


# --- /commands: one handler each --------------------------------------------------------------


def run_command(chat: Conversation, command: Command, model: str) -> Reply:
    """Carry out a parsed /command on the conversation; `model` names the backend in /save files."""
    return HANDLERS[command.name](chat, command, model)


def _image(chat: Conversation, command: Command, model: str) -> Reply:
    return Reply(chat.attach(command.args))


def _pdf(chat: Conversation, command: Command, model: str) -> Reply:
    if len(command.args) not in (1, 2):
        raise InputError("usage: /pdf PATH [PAGES]", "e.g. /pdf manual.pdf 3-5")
    return Reply(chat.attach(command.args[:1], command.args[1] if len(command.args) == 2 else None))


def _reset(chat: Conversation, command: Command, model: str) -> Reply:
    chat.reset()
    return Reply("conversation cleared")


def _save(chat: Conversation, command: Command, model: str) -> Reply:
    if len(command.args) != 1:
        raise InputError(f"usage: /{command.name} FILE")
    path = chat.save(Path(command.args[0]), model, overwrite=command.name == "save!")
    return Reply(f"saved {len(chat.history) // 2} exchanges to {path}")


def _load(chat: Conversation, command: Command, model: str) -> Reply:
    if len(command.args) != 1:
        raise InputError("usage: /load FILE", "a file written by /save")
    return Reply(chat.load(command.args[0]))


def _thinking(chat: Conversation, command: Command, model: str) -> Reply:
    if command.args not in (("on",), ("off",)):
        raise InputError("usage: /thinking on|off")
    shown = command.args[0] == "on"
    return Reply(f"thinking {'shown' if shown else 'hidden'}", show_thinking=shown)


def _help(chat: Conversation, command: Command, model: str) -> Reply:
    return Reply(show_help=True)


def _leave(chat: Conversation, command: Command, model: str) -> Reply:
    return Reply(leave=True)


HANDLERS: dict[str, Callable[[Conversation, Command, str], Reply]] = {
    "image": _image,
    "pdf": _pdf,
    "reset": _reset,
    "save": _save,
    "save!": _save,
    "load": _load,
    "thinking": _thinking,
    "help": _help,
    "exit": _leave,
    "quit": _leave,
}
