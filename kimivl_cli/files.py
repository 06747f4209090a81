"""Rules for the files kimivl reads, shared by every layer.

- A checkpoint reads only files inside its own folder: `inside` resolves a name the checkpoint
  gives (a shard in the index, `config.json`...) with symlinks followed, and refuses anything that
  lands elsewhere (`../other`, `/etc/passwd`, a link out). A Hub cache snapshot's files are links
  into its repo's `blobs/` folder, which counts as inside.
- JSON from a checkpoint is parsed by `read_json`: a regular file of bounded size, any nesting
  depth refused with a message instead of a RecursionError. Messages name the file, never its
  content.
- `is_regular` tells files from FIFOs, sockets and devices, which a folder walk must never open
  (opening a FIFO blocks until someone writes to it).
"""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path
from typing import Any

from kimivl_cli.errors import CheckpointError

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
    resolved = path.resolve()
    if any(resolved.is_relative_to(root) for root in _allowed_roots(folder)):
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


def read_json(path: Path, max_bytes: int = MAX_JSON_BYTES) -> Any:
    """The parsed JSON of a checkpoint file. FileNotFoundError passes through (the caller says
    what is missing); anything else wrong is a CheckpointError naming the file."""
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
        raise CheckpointError(f"{path}: over {max_bytes >> 20} MiB, too large for a checkpoint JSON file")
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


def short_repr(value: object, limit: int = 80) -> str:
    """`repr(value)` cut to `limit` characters: a value quoted in a one-line error stays short."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
