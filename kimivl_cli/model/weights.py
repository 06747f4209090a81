"""Load official Kimi-VL checkpoints: local folder or Hub repo id, safetensors only, tensor by tensor.

The model is built on the meta device, its parameters are allocated empty in their final dtype and
device, and each checkpoint tensor is read, cast and copied into place one at a time: peak host
memory is the model plus about one tensor, never the checkpoint. Every key and shape is checked
against the model from the shard headers before any data is read, so a bad checkpoint fails fast
with one line and never leaves a half-loaded model behind.

Hook for per-tensor transforms (e.g. NF4 quantise-on-load): a module that defines
`checkpoint_tensors() -> {official suffix: shape}` and `load_tensor(suffix, tensor)` owns those
official keys; the loader hands it each tensor instead of copying into a parameter, and does not
look at its parameters. `RoutedExperts` uses this to stack per-expert keys.
"""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path
from typing import NamedTuple

import torch
from torch import nn

from kimivl_cli.errors import CheckpointError
from kimivl_cli.model.config import KimiVLConfig
from kimivl_cli.model.kimivl import KimiVL

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
HUB_PATTERNS = ["*.json", "*.safetensors", "tiktoken.model", "*.jinja"]
# Keys some exporters write that carry nothing we need (recomputed rotary tables).
IGNORED_KEY = re.compile(r"(^|\.)rotary_emb\.inv_freq$")
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


class Target(NamedTuple):
    """Where one official tensor goes: a parameter/buffer `name` of `module`, or its `load_tensor`."""

    module: nn.Module
    name: str
    shape: torch.Size


# --- locating the checkpoint -------------------------------------------------------------------


def _hub_hint(repo: str) -> str:
    return f"run `hf download {repo}` on a machine with network (same HF_HOME), or pass a local folder"


def resolve_checkpoint(path_or_repo: str | Path) -> Path:
    """A local checkpoint folder, or a Hub repo id resolved through the huggingface_hub cache
    (`HF_HOME`); downloads (with progress bars) only if the cache lacks it and we are online."""
    path = Path(path_or_repo).expanduser()
    if path.is_dir():
        return path
    text = str(path_or_repo)
    if path.exists():
        raise CheckpointError(f"{text} is a file", "--model wants a checkpoint folder or a Hub repo id")
    if not _REPO_ID.match(text):
        raise CheckpointError(f"{text}: no such folder", "pass a checkpoint folder or a Hub repo id like owner/name")
    from huggingface_hub import constants, snapshot_download

    try:
        return Path(snapshot_download(text, allow_patterns=HUB_PATTERNS, local_files_only=True))
    except Exception:  # not cached (or partially): fall through to the online path
        pass
    offline = constants.HF_HUB_OFFLINE or os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")
    if offline:
        raise CheckpointError(
            f"{text} is not a local folder nor in the Hugging Face cache ({constants.HF_HUB_CACHE}) and HF_HUB_OFFLINE is set",
            _hub_hint(text),
        )
    try:
        return Path(snapshot_download(text, allow_patterns=HUB_PATTERNS))
    except Exception as exc:  # network, auth, missing repo: all end the same way for the user
        raise CheckpointError(f"could not download {text}: {type(exc).__name__}: {exc}", _hub_hint(text)) from None


def checkpoint_files(folder: Path) -> list[Path]:
    """The safetensors files of a checkpoint folder (sharded via the index, or single); refuses pickle."""
    index = folder / INDEX_FILE
    if index.exists():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            names = sorted(set(weight_map.values()))
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            raise CheckpointError(f"{index}: unreadable shard index ({exc})") from None
        files = [folder / name for name in names]
        for f in files:
            if not f.is_file():
                raise CheckpointError(f"{index.name} lists {f.name}, which is missing", "the download is incomplete")
        return files
    if (folder / SINGLE_FILE).is_file():
        return [folder / SINGLE_FILE]
    found = sorted(folder.glob("*.safetensors"))
    if found:
        return found
    pickles = sorted(p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        raise CheckpointError(
            f"{folder}: only pickle weights ({', '.join(pickles[:3])}); refusing to load them, unpickling can run code",
            "use a checkpoint that ships *.safetensors (all official Kimi-VL repos do)",
        )
    raise CheckpointError(f"{folder}: no {SINGLE_FILE} or {INDEX_FILE}", "is this a Kimi-VL checkpoint folder?")


# --- building and filling the model ------------------------------------------------------------


def materialize(model: nn.Module, dtype: torch.dtype, device: torch.device | str) -> None:
    """Replace meta parameters/buffers with uninitialised storage in their final dtype and device.

    Floating parameters take `dtype` unless their module sets `param_dtype` (the fp32 router).
    Tied parameters stay tied. A module whose non-persistent buffers are computed must define
    `reset_buffers()`, called after allocation.
    """
    made: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # id(meta) -> (meta kept alive, real)

    def alloc(t: torch.Tensor, want: torch.dtype) -> torch.Tensor:
        if id(t) not in made:
            real = torch.empty(t.shape, dtype=want if t.is_floating_point() else t.dtype, device=device)
            made[id(t)] = (t, nn.Parameter(real, requires_grad=False) if isinstance(t, nn.Parameter) else real)
        return made[id(t)][1]

    for module in model.modules():
        want = getattr(module, "param_dtype", None) or dtype
        for name, p in list(module._parameters.items()):
            if p is not None:
                module._parameters[name] = alloc(p, want)
        meta_buffers = False
        for name, b in list(module._buffers.items()):
            if b is not None and b.is_meta:
                module._buffers[name] = alloc(b, want)
                meta_buffers |= name in module._non_persistent_buffers_set
        if meta_buffers:
            if not hasattr(module, "reset_buffers"):
                raise RuntimeError(f"{type(module).__name__} has computed buffers but no reset_buffers()")
            module.reset_buffers()


def checkpoint_targets(model: nn.Module, prefix: str = "") -> dict[str, Target]:
    """Every official key the model needs, with where it goes and its expected shape."""
    targets: dict[str, Target] = {}
    seen: set[int] = set()

    def walk(module: nn.Module, at: str) -> None:
        if hasattr(module, "checkpoint_tensors"):
            for name, shape in module.checkpoint_tensors().items():
                targets[at + name] = Target(module, name, torch.Size(shape))
            return
        tensors = list(module.named_parameters(recurse=False)) + [
            (n, b) for n, b in module.named_buffers(recurse=False) if n not in module._non_persistent_buffers_set
        ]
        for name, t in tensors:
            if id(t) not in seen:  # a tied weight is loaded once, under its first name
                seen.add(id(t))
                targets[at + name] = Target(module, name, t.shape)
        for name, child in module.named_children():
            walk(child, f"{at}{name}.")

    walk(model, prefix)
    return targets


_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}


class _Entry(NamedTuple):
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int  # byte offsets in the file
    end: int


class SafetensorsFile:
    """Reads one safetensors file tensor by tensor with plain `readinto` (no pickle, no mmap).

    safetensors' own `safe_open` maps the whole file, and every page a tensor touched stays in
    the process's RSS until the file closes: loading a shard would cost the shard. Reading each
    tensor into its own buffer keeps the peak at one tensor. The header is validated here.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            size = path.stat().st_size
            with open(path, "rb") as fh:
                n = int.from_bytes(fh.read(8), "little")
                if not 2 <= n <= min(size - 8, 1 << 28):
                    raise ValueError(f"header length {n} does not fit the file")
                header = json.loads(fh.read(n))
            self.entries = {
                key: self._entry(key, info, 8 + n, size) for key, info in header.items() if key != "__metadata__"
            }
        except (OSError, ValueError, TypeError, KeyError, AttributeError) as exc:
            raise CheckpointError(f"{path.name}: not a readable safetensors file ({exc})") from None

    @staticmethod
    def _entry(key: str, info: dict, base: int, size: int) -> _Entry:
        dtype, shape = _DTYPES[info["dtype"]], tuple(int(d) for d in info["shape"])
        start, end = (base + int(o) for o in info["data_offsets"])
        if not base <= start <= end <= size or end - start != math.prod(shape) * dtype.itemsize:
            raise ValueError(f"{key}: data offsets do not match its shape and dtype")
        return _Entry(dtype, shape, start, end)

    def read(self, key: str, fh) -> torch.Tensor:
        e = self.entries[key]
        buf = torch.empty(e.end - e.start, dtype=torch.uint8)
        view, done = memoryview(buf.numpy()), 0
        fh.seek(e.start)
        while done < len(view):
            got = fh.readinto(view[done:])
            if not got:
                raise CheckpointError(f"{self.path.name}: file ends inside {key}", "the download is incomplete")
            done += got
        return buf.view(e.dtype).view(e.shape)


def _listing(keys: list[str]) -> str:
    return ", ".join(keys[:3]) + (f" and {len(keys) - 3} more" if len(keys) > 3 else "")


def plan_load(targets: dict[str, Target], files: list[Path], prefix: str = "") -> dict[SafetensorsFile, list[str]]:
    """Check keys and shapes from the headers alone; return the keys to read from each file.

    Keys outside `prefix` are left alone (loading one part of the model); inside it, a missing,
    unknown or misshapen tensor is a `CheckpointError` naming it.
    """
    plan: dict[SafetensorsFile, list[str]] = {}
    unexpected: list[str] = []
    for path in files:
        file = SafetensorsFile(path)
        plan[file] = []
        for key, entry in file.entries.items():
            if not key.startswith(prefix) or IGNORED_KEY.search(key):
                continue
            target = targets.get(key)
            if target is None:
                unexpected.append(key)
            elif entry.shape != tuple(target.shape):
                raise CheckpointError(
                    f"{path.name}: {key} has shape {list(entry.shape)}, config.json implies {list(target.shape)}",
                    "config.json and the weights do not belong together",
                )
            else:
                plan[file].append(key)
    found = {k for keys in plan.values() for k in keys}
    missing = sorted(set(targets) - found)
    if missing:
        raise CheckpointError(
            f"checkpoint lacks {len(missing)} tensor(s) the model needs: {_listing(missing)}",
            "the download is incomplete or config.json does not match the weights",
        )
    if unexpected:
        raise CheckpointError(
            f"checkpoint has {len(unexpected)} tensor(s) this model does not know: {_listing(sorted(unexpected))}",
            "config.json does not match the weights, or this is not a Kimi-VL checkpoint",
        )
    return plan


@torch.no_grad()
def load_checkpoint(model: nn.Module, folder: Path, prefix: str = "") -> None:
    """Stream the checkpoint in `folder` into `model`, whose root sits at official key `prefix`
    (e.g. `language_model.` to load the language model alone). Peak: one tensor + the model."""
    targets = checkpoint_targets(model, prefix)
    plan = plan_load(targets, checkpoint_files(folder), prefix)
    for file, keys in plan.items():
        with open(file.path, "rb", buffering=0) as fh:
            for key in keys:
                module, name, _ = targets[key]
                tensor = file.read(key, fh)
                if hasattr(module, "load_tensor"):
                    module.load_tensor(name, tensor)
                else:
                    getattr(module, name).copy_(tensor)
                del tensor


def load_model(
    path_or_repo: str | Path, *, dtype: torch.dtype = torch.bfloat16, device: torch.device | str = "cpu"
) -> tuple[KimiVL, KimiVLConfig]:
    """Build `KimiVL` from a checkpoint folder or Hub repo id, weights cast to `dtype` on `device`."""
    folder = resolve_checkpoint(path_or_repo)
    config = KimiVLConfig.from_file(folder / "config.json")
    with torch.device("meta"):
        model = KimiVL(config)
    materialize(model, dtype, device)
    load_checkpoint(model, folder)
    return model.eval(), config
