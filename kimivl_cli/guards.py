"""Guards on the files kimivl reads and writes, shared by every layer.

- A checkpoint reads only files inside its own folder: `inside` resolves a name the checkpoint
  gives (a shard in the index, `config.json`...) with symlinks followed, and refuses anything that
  lands elsewhere (`../other`, `/etc/passwd`, a link out). A Hub cache snapshot's files are links
  into its repo's `blobs/` folder, which counts as inside.
- JSON from a checkpoint is parsed by `read_json`: a regular file of bounded size, any nesting
  depth refused with a message instead of a RecursionError. Messages name the file, never its
  content.
- `is_regular` tells files from FIFOs, sockets and devices, which a folder walk must never open
  (opening a FIFO blocks until someone writes to it); `read_stream` reads a pipe or device named
  on purpose (stdin, `<(cmd)`) once and bounded (`/dev/zero` ends with a message, not MemoryError);
  `check_output` keeps writers off anything but regular files (`-o /dev/null --force` must not
  delete the device).
"""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path
from typing import Any, BinaryIO

from kimivl_cli.errors import CheckpointError, InputError

MAX_STREAM_BYTES = 256 << 20
"""Most bytes read into memory from stdin, a pipe or a device (`kimivl ask - < x`, `<(cmd)`):
larger inputs go through a file, which is read in pieces."""

MAX_JSON_BYTES = 64 << 20
"""Largest checkpoint JSON read: a real shard index is ~100 KB, the tokenizer config a few KB."""


def _allowed_roots(folder: Path) -> list[Path]:
    root = folder.resolve()
    roots = [root]
    if root.parent.name == "snapshots" and (blobs := root.parent.parent / "blobs").is_dir():
        roots.append(blobs.resolve())  # huggingface_hub cache: snapshots/<rev>/x -> ../../blobs/<hash>
    return roots


def inside(folder: Path, name: str, what: str = "") -> Path:
    """`folder / name` when it resolves (symlinks followed) inside `folder`; else a CheckpointError.

    The file need not exist. `what` names who points there, for the message (e.g. the index file).
    """
    path = folder / name
    try:
        resolved = path.resolve()
    except (OSError, RuntimeError):  # a symlink loop (RuntimeError before Python 3.13)
        resolved = None
    if resolved is not None and any(resolved.is_relative_to(root) for root in _allowed_roots(folder)):
        return path
    where = f"{what} names {short_repr(name)}, which" if what else short_repr(name)
    raise CheckpointError(
        f"{folder}: {where} resolves outside the checkpoint folder",
        "every file of a checkpoint must sit inside its folder (no '..', absolute paths or links out)",
    )


def is_regular(path: Path) -> bool:
    """True for a regular file (after symlinks); False for FIFOs, sockets, devices, folders, dangling links."""
    try:
        return stat.S_ISREG(os.stat(path).st_mode)
    except OSError:
        return False


def read_stream(stream: BinaryIO, name: str, limit: int = MAX_STREAM_BYTES) -> bytes:
    """All of a pipe's or device's bytes, at most `limit` (InputError beyond, before holding more)."""
    chunks, size = [], 0
    try:
        while chunk := stream.read(1 << 20):
            size += len(chunk)
            if size > limit:
                raise InputError(f"{name} gives more than {limit / 2**20:.0f} MiB", "save it to a file and pass that")
            chunks.append(chunk)
    except OSError as exc:
        raise InputError(f"cannot read {name} ({exc.strerror or exc})") from None
    return b"".join(chunks)


def check_output(path: Path) -> None:
    """InputError when `path` exists and is not a regular file or folder: a FIFO, socket or device
    is never truncated, replaced or unlinked as an output."""
    if path.exists() and not is_regular(path) and not path.is_dir():
        raise InputError(f"{path} is not a regular file", "give a file path, or leave out -o to write to stdout")


def read_checkpoint_file(path: Path, max_bytes: int) -> bytes:
    """The bytes of a checkpoint file: regular, at most `max_bytes` (CheckpointError otherwise,
    naming the file, never quoting it). FileNotFoundError passes through: the caller says what is missing."""
    if path.exists() and not is_regular(path):
        raise CheckpointError(f"{path}: not a regular file", "replace it with the checkpoint's own file")
    try:
        with open(path, "rb") as fh:
            data = fh.read(max_bytes + 1)
    except FileNotFoundError:
        raise
    except OSError as exc:
        raise CheckpointError(f"{path}: unreadable ({exc.strerror or exc})") from None
    if len(data) > max_bytes:
        raise CheckpointError(f"{path}: over {max_bytes >> 20} MiB, too large for this checkpoint file")
    return data


def read_json(path: Path, max_bytes: int = MAX_JSON_BYTES) -> Any:
    """The parsed JSON of a checkpoint file (`read_checkpoint_file`'s rules, and any nesting depth
    refused with a message instead of a RecursionError)."""
    data = read_checkpoint_file(path, max_bytes)
    try:
        return json.loads(data.decode("utf-8"))
    except UnicodeDecodeError:
        raise CheckpointError(f"{path}: unreadable (not UTF-8 text)") from None
    except json.JSONDecodeError as exc:
        raise CheckpointError(
            f"{path}: unreadable (not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno})"
        ) from None
    except RecursionError:
        raise CheckpointError(f"{path}: unreadable (JSON nested too deeply)") from None


FOLDER_HINT = "is this a Kimi-VL checkpoint folder?"


def read_config(
    path: Path, name: str, *, missing_hint: str = FOLDER_HINT, fix_hint: str | None = None, optional: bool = False
) -> dict[str, Any]:
    """A checkpoint's JSON config (config.json, preprocessor_config.json, tokenizer_config.json,
    generation_config.json) as an object, by `read_json`'s rules: the one config reader, so every
    file fails in the same words. `name` is the file's role (`path` may be any file). Missing: {}
    if `optional`, else an error with `missing_hint`; any other fault carries `fix_hint` if given."""
    try:
        data = read_json(path)
    except FileNotFoundError:
        if optional:
            return {}
        raise CheckpointError(f"{path}: no {name}", missing_hint) from None
    except CheckpointError as exc:
        raise CheckpointError(exc.message, fix_hint or exc.hint) from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: top level is not a JSON object", fix_hint)
    return data


def short_repr(value: object, limit: int = 80) -> str:
    """`repr(value)` cut to `limit` characters: a value quoted in a one-line error stays short."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
