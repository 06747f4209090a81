"""Load official Kimi-VL checkpoints: local folder or Hub repo id, safetensors only, tensor by tensor.

The model is built on the meta device, its parameters are allocated empty in their final dtype and
device, and each checkpoint tensor is read, cast and copied into place one at a time: peak host
memory is the model plus about one tensor, never the checkpoint. Every key and shape is checked
against the model from the shard headers before any data is read, so a bad checkpoint fails fast
with one line and never leaves a half-loaded model behind.

Hooks (`model/hooks.py`, protocols the modules declare): an `OwnsCheckpointKeys` module takes its
official keys itself (`checkpoint_tensors() -> {official suffix: shape}`, `load_tensor(suffix, tensor)`)
instead of a copy into a parameter; `RoutedExperts` stacks per-expert keys this way, the quantized
modules quantise on load. A `KeepsDtype` module keeps its own dtype; a `DevicePaths` module is swapped,
when the device is known (`materialize`), for the version that runs there (e.g. the Triton experts).

Quantization (`quant="nf4"|"int8"`): the meta-built language model's linears are swapped for empty
quantized modules (`kimivl_cli.quant.modules`) on the target device, which take their bf16 tensors
through the same hook and quantize each one as it arrives: the bf16 model never exists. A checkpoint
written by `save_quantized` (metadata `{"kimivl_quant": mode}`) stores those modules' buffers
(packed codes, absmax or scales) under `<module>.<buffer>` keys; the loader detects it and copies
them straight in, no requantization.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import shutil
import tempfile
from collections.abc import Callable
from contextlib import AbstractContextManager
from pathlib import Path
from typing import NamedTuple, TypeVar

import torch
from torch import nn

from kimivl_cli.errors import CheckpointError, InputError, RuntimeFailure
from kimivl_cli.files import user_file_mode
from kimivl_cli.guards import check_output, inside, is_regular, read_json, short_repr
from kimivl_cli.model.config import KimiVLConfig
from kimivl_cli.model.hooks import KeepsDtype, OwnsCheckpointKeys, place
from kimivl_cli.model.hub import is_repo_id
from kimivl_cli.model.kimivl import KimiVL
from kimivl_cli.quant import SAVED_MODES, STORED_MODES, quant_mode
from kimivl_cli.quant.modules import quantize_linears_

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
HUB_PATTERNS = ["*.json", "*.safetensors", "tiktoken.model", "*.jinja"]
# Keys some exporters write that carry nothing we need (recomputed rotary tables).
IGNORED_KEY = re.compile(r"(^|\.)rotary_emb\.inv_freq$")
# --quant auto keeps bf16 while the weights take at most this share of the device's memory
# (the rest is for activations, the cache and, on CPU, everything else running); beyond it, nf4.
AUTO_WEIGHT_SHARE = 0.7
QUANT_METADATA_KEY = "kimivl_quant"  # safetensors `__metadata__` entry of a pre-quantized checkpoint
SHARD_BYTES = 4 << 30  # shard size `save_quantized` writes


M = TypeVar("M", bound=nn.Module)

LoadProgress = Callable[[int, str], AbstractContextManager[Callable[[int], None]]]
"""`progress(total_bytes, description)` -> a context yielding `advance(nbytes)`: how a caller shows loading."""


@contextlib.contextmanager
def _no_progress(total: int, description: str):
    yield lambda n: None


class Target(NamedTuple):
    """Where one official tensor goes: a parameter/buffer `name` of `module`, or (`hook`) its `load_tensor`."""

    module: nn.Module
    name: str
    shape: torch.Size
    hook: bool = False


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
        raise CheckpointError(f"{text} is a file", "`model` wants a checkpoint folder or a Hub repo id")
    if not is_repo_id(text):
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
        raise CheckpointError(f"could not download {text} ({_hub_reason(exc)})", _hub_hint(text)) from None


def _hub_reason(exc: Exception) -> str:
    """What went wrong with a download, in words (the Hub's exceptions carry paragraphs)."""
    from huggingface_hub import errors

    if isinstance(exc, errors.GatedRepoError):
        return "the repository is gated: accept its terms on the Hub and log in"
    if isinstance(exc, errors.RepositoryNotFoundError):
        return "no such repository on the Hub, or it is private"
    if isinstance(exc, (errors.LocalEntryNotFoundError, ConnectionError, TimeoutError, OSError)):
        return "the Hub is not reachable from here"
    return " ".join(str(exc).split())[:200] or type(exc).__name__


def checkpoint_files(folder: Path) -> list[Path]:
    """The safetensors files of a checkpoint folder (sharded via the index, or single); refuses pickle.

    Every file must resolve inside the folder (`guards.inside`): an index naming `../x` or an
    absolute path, or a shard that is a symlink out of the folder, is refused before it is opened.
    """
    index = inside(folder, INDEX_FILE)
    if index.exists():
        weight_map = read_json(index)
        if not isinstance(weight_map, dict) or not isinstance(weight_map := weight_map.get("weight_map"), dict):
            raise CheckpointError(f"{index}: no 'weight_map' object", "the shard index is damaged")
        values = list(weight_map.values())
        if not values or not all(isinstance(name, str) and name for name in values):
            raise CheckpointError(f"{index}: 'weight_map' must map tensor names to shard file names")
        names = sorted(set(values))
        files = [inside(folder, name, INDEX_FILE) for name in names]
        for f in files:
            if not is_regular(f):
                raise CheckpointError(
                    f"{INDEX_FILE} lists {f.name}, which is {'not a regular file' if f.exists() else 'missing'}",
                    "the download is incomplete",
                )
        return files
    single = inside(folder, SINGLE_FILE)
    if single.exists():
        if not is_regular(single):
            raise CheckpointError(f"{single}: not a regular file", "replace it with the checkpoint's weights")
        return [single]
    found = [inside(folder, p.name) for p in sorted(folder.glob("*.safetensors")) if is_regular(p)]
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


def materialize(model: M, dtype: torch.dtype, device: torch.device | str) -> M:
    """Choose each module's path for `device` (`hooks.place`: the model returned is `model` unless it
    is itself swapped), then replace meta parameters/buffers with uninitialised storage in their final
    dtype and device.

    Floating parameters take `dtype` unless their module `KeepsDtype` (the fp32 router).
    Tied parameters stay tied. Computed (non-persistent) buffers are refused: nothing would fill them
    (modules compute such values per call, like `RotaryEmbedding`).
    """
    model = place(model, device)
    made: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # id(meta) -> (meta kept alive, real)

    def alloc(t: torch.Tensor, want: torch.dtype) -> torch.Tensor:
        if id(t) not in made:
            real = torch.empty(t.shape, dtype=_final_dtype(t, want), device=device)
            made[id(t)] = (t, nn.Parameter(real, requires_grad=False) if isinstance(t, nn.Parameter) else real)
        return made[id(t)][1]

    for module in model.modules():
        want = _param_dtype(module, dtype)
        for name, p in list(module._parameters.items()):
            if p is not None:
                module._parameters[name] = alloc(p, want)
        for name, b in list(module._buffers.items()):
            if b is not None and b.is_meta:
                if name in module._non_persistent_buffers_set:
                    raise RuntimeError(
                        f"{type(module).__name__}.{name} is a computed buffer, which loading leaves empty"
                    )
                module._buffers[name] = alloc(b, want)
    return model


def _param_dtype(module: nn.Module, dtype: torch.dtype) -> torch.dtype:
    return module.param_dtype if isinstance(module, KeepsDtype) else dtype


def checkpoint_targets(model: nn.Module, prefix: str = "", stored_quantized: bool = False) -> dict[str, Target]:
    """Every official key the model needs, with where it goes and its expected shape.

    `stored_quantized`: the checkpoint holds quantized modules' own buffers (see `save_quantized`),
    so those modules (class attribute `quantized`) are read like plain ones, not through their hook.
    """
    targets: dict[str, Target] = {}
    seen: set[int] = set()

    def walk(module: nn.Module, at: str) -> None:
        if isinstance(module, OwnsCheckpointKeys) and not (stored_quantized and module.quantized):
            for name, shape in module.checkpoint_tensors().items():
                targets[at + name] = Target(module, name, torch.Size(shape), hook=True)
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
                    raise ValueError("the header length does not fit the file")  # never the number: it is file content
                header = json.loads(fh.read(n))
            if not isinstance(header, dict):
                raise ValueError("the header is not a JSON object")
            metadata = header.pop("__metadata__", None) or {}
            if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
                raise ValueError("__metadata__ must map names to strings")
            self.metadata: dict[str, str] = metadata
            self.entries = {key: self._entry(key, info, 8 + n) for key, info in header.items()}
            self._check_layout(8 + n, size)
        except OSError as exc:
            raise CheckpointError(f"{path.name}: unreadable ({exc.strerror or exc})") from None
        except RecursionError:
            raise CheckpointError(f"{path.name}: not a safetensors file (its header is nested too deeply)") from None
        except ValueError as exc:  # JSONDecodeError and UnicodeDecodeError included
            reason = "its header is not valid JSON" if isinstance(exc, json.JSONDecodeError) else str(exc)
            raise CheckpointError(f"{path.name}: not a readable safetensors file ({reason})") from None

    @staticmethod
    def _entry(key: str, info: object, base: int) -> _Entry:
        if not isinstance(info, dict):
            raise ValueError(f"{short_repr(key)} has no dtype/shape/data_offsets object")
        dtype = _DTYPES.get(info.get("dtype"))  # type: ignore[arg-type]
        shape, offsets = info.get("shape"), info.get("data_offsets")
        if dtype is None:
            raise ValueError(f"{short_repr(key)} has an unknown dtype")
        if not _int_list(shape) or not _int_list(offsets) or len(offsets) != 2:
            raise ValueError(f"{short_repr(key)} needs a shape and two data offsets, as non-negative integers")
        start, end = base + offsets[0], base + offsets[1]
        if end - start != math.prod(shape) * dtype.itemsize:
            raise ValueError(f"{short_repr(key)}: data offsets do not match its shape and dtype")
        return _Entry(dtype, tuple(shape), start, end)

    def _check_layout(self, base: int, size: int) -> None:
        """Tensors tile the data area exactly, in some order: no overlap, no gap, nothing past the end
        (the format's own rule; overlapping tensors would alias one another's bytes)."""
        at = base
        for e in sorted(self.entries.values(), key=lambda e: (e.start, e.end)):
            if e.start != at:
                raise ValueError("tensors overlap" if e.start < at else "tensor data has gaps")
            at = e.end
        if at > size:
            raise ValueError("tensor data runs past the end of the file (truncated download?)")

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


def _int_list(value: object) -> bool:
    return isinstance(value, list) and all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value)


def _listing(keys: list[str]) -> str:
    return ", ".join(keys[:3]) + (f" and {len(keys) - 3} more" if len(keys) > 3 else "")


def stored_quant(files: list[SafetensorsFile]) -> str:
    """The quantization a checkpoint was saved with ("none" for an official one); shards must agree."""
    modes = {f.metadata.get(QUANT_METADATA_KEY, "none") for f in files}
    if len(modes) > 1 or not modes <= set(STORED_MODES):
        raise CheckpointError(
            f"{files[0].path.parent}: shards disagree on or have an unknown {QUANT_METADATA_KEY!r}: {sorted(modes)}",
            "re-run `kimivl quantize` from the original checkpoint",
        )
    return modes.pop()


def _target_dtype(target: Target) -> torch.dtype:
    return getattr(target.module, target.name).dtype


def _wants_float(target: Target) -> bool:
    return target.hook or _target_dtype(target).is_floating_point


def _dtype_fits(stored: torch.dtype, target: Target) -> bool:
    """Floating weights may come in any floating dtype (they are cast); integer buffers (packed
    codes) only in their own. A float weight stored as integers is damage, never a cast."""
    if _wants_float(target):
        return stored.is_floating_point
    return stored == _target_dtype(target)


def plan_load(
    targets: dict[str, Target], files: list[SafetensorsFile], prefix: str = ""
) -> dict[SafetensorsFile, list[str]]:
    """Check keys and shapes from the headers alone; return the keys to read from each file.

    Keys outside `prefix` are left alone (loading one part of the model); inside it, a missing,
    unknown or misshapen tensor is a `CheckpointError` naming it.
    """
    plan: dict[SafetensorsFile, list[str]] = {}
    unexpected: list[str] = []
    for file in files:
        path = file.path
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
            elif not _dtype_fits(entry.dtype, target):
                raise CheckpointError(
                    f"{path.name}: {key} is stored as {str(entry.dtype).removeprefix('torch.')}, "
                    f"the model needs {'floating-point values' if _wants_float(target) else _target_dtype(target)}",
                    "the weights are damaged or were written by a broken exporter",
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


def planned_bytes(plan: dict[SafetensorsFile, list[str]]) -> int:
    return sum(file.entries[key].end - file.entries[key].start for file, keys in plan.items() for key in keys)


@torch.no_grad()
def stream_tensors(
    targets: dict[str, Target], plan: dict[SafetensorsFile, list[str]], advance: Callable[[int], None]
) -> None:
    """Read each planned tensor and copy it into its target (or hand it to the target's hook);
    `advance` is told each tensor's bytes once it is in place."""
    for file, keys in plan.items():
        with open(file.path, "rb", buffering=0) as fh:
            for key in keys:
                module, name, _, hook = targets[key]
                tensor = file.read(key, fh)
                if hook:
                    module.load_tensor(name, tensor)
                else:
                    getattr(module, name).copy_(tensor)
                advance(tensor.nbytes)
                del tensor


def device_memory_bytes(device: torch.device | str) -> int:
    """Memory weights may use on `device`: a GPU's total memory, or the host's available memory for CPU."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    try:
        with open("/proc/meminfo", encoding="ascii") as meminfo:
            fields = dict(line.split(":", 1) for line in meminfo)
        return int(fields["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):  # not Linux: total physical memory
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def choose_quant(config: KimiVLConfig, dtype: torch.dtype, device: torch.device | str) -> tuple[str, str]:
    """`--quant auto`: ("none", why) when the unquantized model fits `AUTO_WEIGHT_SHARE` of the
    device's memory, else ("nf4", why). Kimi-VL A3B (16.4B, 33 GB in bf16) is nf4 on a 24 GB GPU or
    a 24 GB host and bf16 on an 80 GB GPU. O(parameters) on the meta device, no memory used."""
    with torch.device("meta"):
        params = sum(p.numel() for p in KimiVL(config).parameters())
    weight_bytes = params * dtype.itemsize
    budget = device_memory_bytes(device)
    gib = f"{weight_bytes / 2**30:.2f} GiB of {str(dtype).removeprefix('torch.')} weights"
    if weight_bytes <= AUTO_WEIGHT_SHARE * budget:
        return "none", f"{gib} fit in {budget / 2**30:.1f} GiB ({torch.device(device).type})"
    return "nf4", f"{gib} do not fit in {budget / 2**30:.1f} GiB ({torch.device(device).type}): quantizing to nf4"


def load_model(
    path_or_repo: str | Path,
    *,
    dtype: torch.dtype = torch.bfloat16,
    device: torch.device | str = "cpu",
    quant: str = "none",
    progress: LoadProgress | None = None,
) -> tuple[KimiVL, KimiVLConfig]:
    """Build `KimiVL` from a checkpoint folder or Hub repo id, weights cast to `dtype` on `device`.

    quant "nf4" | "int8": the language model's linears (and, for nf4, its routed experts) are
    quantized tensor by tensor while loading (see the module doc); "auto": see `choose_quant`.
    A pre-quantized checkpoint loads in the format it was saved in; asking for another one is a
    `CheckpointError`.
    """
    quant = quant_mode(quant)
    folder = resolve_checkpoint(path_or_repo)
    config = KimiVLConfig.from_file(inside(folder, "config.json"))
    files = [SafetensorsFile(path) for path in checkpoint_files(folder)]
    stored = stored_quant(files)
    check_counts(config, files, stored)
    with torch.device("meta"):
        model = KimiVL(config)
    if stored == "none":  # config.json against the weights first, before choosing how to quantize them
        plan_load(checkpoint_targets(model), files)
    if quant == "auto":
        quant = stored if stored != "none" else choose_quant(config, dtype, device)[0]
    if stored != "none" and quant not in ("none", stored):
        raise CheckpointError(
            f"{folder} is pre-quantized as {stored}; it cannot be loaded as {quant}",
            f"pass `quant` {stored}, or quantize the original checkpoint",
        )
    try:
        quantize_linears_(model.language_model, stored if stored != "none" else quant, "meta")
    except ValueError as exc:  # NF4 needs inner dims in multiples of its 64-weight blocks
        raise CheckpointError(
            f"{folder} cannot be quantized as {quant}: {exc}", "use `quant` int8, or no quantization"
        ) from None
    model = place(model, device)  # the modules for the device, before the targets name them
    # Everything is checked on the meta model, from the shard headers, before one byte is allocated:
    # keys, shapes, dtypes, then whether the model fits the device at all.
    targets = checkpoint_targets(model, stored_quantized=stored != "none")
    plan = plan_load(targets, files)
    check_fits(model, dtype, device)
    materialize(model, dtype, device)
    quantizing = f", quantizing to {quant.upper()}" if stored == "none" and quant != "none" else ""
    description = f"loading {Path(str(path_or_repo)).name}{quantizing}"
    with (progress or _no_progress)(planned_bytes(plan), description) as advance:
        stream_tensors(targets, plan, advance)
    return model.eval(), config


def check_counts(config: KimiVLConfig, files: list[SafetensorsFile], stored: str) -> None:
    """Layer and expert counts against the number of tensors in the checkpoint, before a model with
    that many modules is built: each layer has several tensors, each official expert three per layer."""
    tensors = sum(len(f.entries) for f in files)
    counts = {
        "text_config.num_hidden_layers": config.text.num_hidden_layers,
        "vision_config.num_hidden_layers": config.vision.num_hidden_layers,
    }
    if stored == "none":  # pre-quantized checkpoints stack the experts: one tensor for all of them
        counts["text_config.n_routed_experts"] = config.text.n_routed_experts
    for name, count in counts.items():
        if count > tensors:
            raise CheckpointError(
                f"config.json: {name} is {count}, but the checkpoint holds only {tensors} tensors",
                "config.json does not match the weights",
            )


def _final_dtype(t: torch.Tensor, want: torch.dtype) -> torch.dtype:
    """The dtype `materialize` gives a tensor: `want` for floating ones, its own otherwise."""
    return want if t.is_floating_point() else t.dtype


def model_bytes(model: nn.Module, dtype: torch.dtype) -> int:
    """Bytes `materialize(model, dtype, ...)` will allocate (tied tensors once)."""
    seen: set[int] = set()
    total = 0
    for module in model.modules():
        want = _param_dtype(module, dtype)
        for t in [*module._parameters.values(), *module._buffers.values()]:
            if t is not None and id(t) not in seen:
                seen.add(id(t))
                total += t.numel() * _final_dtype(t, want).itemsize
    return total


def check_fits(model: nn.Module, dtype: torch.dtype, device: torch.device | str) -> None:
    """RuntimeFailure when the weights alone exceed the device's memory: say so instead of being killed."""
    need, have = model_bytes(model, dtype), device_memory_bytes(device)
    if need > have:
        raise RuntimeFailure(
            f"the model's weights need {need / 2**30:.1f} GiB, {torch.device(device).type} has "
            f"{have / 2**30:.1f} GiB available",
            "use `quant` nf4, or a machine with more memory",
        )


def _is_weight_file(path: Path) -> bool:
    return path.name == INDEX_FILE or path.suffix == ".safetensors"


STAGING_PREFIX = ".kimivl-quantize-"
"""Folder inside DST where `save_quantized` writes before moving files into place; one left by a
killed run (with safetensors' own `.tmpXXXXXX` files in it) is removed by the next `--force`."""
_SAFETENSORS_PARTIAL = re.compile(r"\.tmp[A-Za-z0-9]{6}")  # save_file writes here, then renames (a kill leaves it)


def _check_destination(folder: Path, dst: Path, force: bool) -> None:
    """DST must not be SRC or inside it (writing there replaces the weights being read), must be a
    folder or absent, and may hold files only with `force`."""
    check_output(dst)
    try:
        source, target = folder.resolve(), dst.resolve()
    except (OSError, RuntimeError):  # a symlink loop (RuntimeError before Python 3.13)
        raise InputError(f"{dst}: the path does not resolve (a symlink loop?)") from None
    if target == source or target.is_relative_to(source):
        raise InputError(
            f"{dst} is {'the source checkpoint' if target == source else 'inside the source checkpoint'} {folder}",
            "write the quantized checkpoint to a new folder elsewhere",
        )
    if dst.exists() and (not dst.is_dir() or any(dst.iterdir())) and not force:
        raise InputError(f"{dst} already exists", "pick another destination or pass `force` to replace it")


@torch.no_grad()
def save_quantized(
    src: str | Path,
    dst: Path,
    quant: str = "nf4",
    *,
    dtype: torch.dtype = torch.bfloat16,
    force: bool = False,
    progress: LoadProgress | None = None,
) -> list[Path]:
    """Write `src` (folder or Hub id) quantized as `quant` to folder `dst`; returns the files written.

    The model is loaded quantized (peak: the quantized model plus one bf16 tensor, ~10.5 GB for the
    real one), then written in safetensors shards of up to 4 GiB: quantized modules as their buffers
    (`...q_proj.packed`, `...mlp.experts.gate_proj_packed` [E, N, K/2]...), everything else under its
    official key in `dtype`, with `{"kimivl_quant": quant, "format": "pt"}` as metadata. The other
    files of `src` (config, tokenizer, preprocessor and generation configs) are copied beside.
    An existing non-empty `dst` is an `InputError` unless `force`, which replaces its weight files;
    `dst` may not be `src` or inside it. Files are written to a staging folder in `dst` and moved
    into place once all are complete, so a killed run leaves the old weights and a staging folder
    that the next `force` removes.
    """
    from safetensors.torch import save_file

    quant = quant_mode(quant, SAVED_MODES)
    folder = resolve_checkpoint(src)
    _check_destination(folder, dst, force)
    copied = [inside(folder, p.name) for p in sorted(folder.iterdir()) if is_regular(p) and _is_copied_file(p)]
    model, _ = load_model(folder, dtype=dtype, device="cpu", quant=quant, progress=progress)
    targets = checkpoint_targets(model, stored_quantized=True)
    if dst.is_file():
        dst.unlink()
    dst.mkdir(parents=True, exist_ok=True)
    for stale in dst.iterdir():  # what a killed run left: our staging folder, or safetensors' partial file
        if stale.name.startswith(STAGING_PREFIX) and stale.is_dir():
            shutil.rmtree(stale, ignore_errors=True)
        elif _SAFETENSORS_PARTIAL.fullmatch(stale.name) and is_regular(stale):
            stale.unlink()
    staging = Path(tempfile.mkdtemp(prefix=STAGING_PREFIX, dir=dst))
    try:
        names = _write_shards(targets, staging, quant, save_file)
        for path in copied:
            shutil.copyfile(path, staging / path.name)
        for old in dst.iterdir():
            if _is_weight_file(old):
                old.unlink()
        for name in [*names, *(p.name for p in copied)]:
            os.replace(staging / name, dst / name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return [dst / name for name in [*names, *(p.name for p in copied)]]


def _is_copied_file(path: Path) -> bool:
    return not _is_weight_file(path) and path.suffix not in PICKLE_SUFFIXES


def _write_shards(targets: dict[str, Target], folder: Path, quant: str, save_file) -> list[str]:
    """The model's tensors as safetensors shards of up to `SHARD_BYTES` (+ index) in `folder`; their names."""
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for key, (module, name, _, hook) in targets.items():
        tensor = (module.checkpoint_tensor(name) if hook else getattr(module, name)).contiguous()
        if size and size + tensor.nbytes > SHARD_BYTES:
            shards.append({})
            size = 0
        shards[-1][key] = tensor
        size += tensor.nbytes
    metadata = {QUANT_METADATA_KEY: quant, "format": "pt"}
    mode = user_file_mode()  # safetensors writes its files 0600
    if len(shards) == 1:
        save_file(shards[0], folder / SINGLE_FILE, metadata=metadata)
        os.chmod(folder / SINGLE_FILE, mode)
        return [SINGLE_FILE]
    names, weight_map = [], {}
    for i, shard in enumerate(shards, 1):
        name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, folder / name, metadata=metadata)
        os.chmod(folder / name, mode)
        weight_map.update(dict.fromkeys(shard, name))
        names.append(name)
    index = {"metadata": {"total_size": sum(t.nbytes for s in shards for t in s.values())}, "weight_map": weight_map}
    (folder / INDEX_FILE).write_text(json.dumps(index, indent=2), encoding="utf-8")
    return [*names, INDEX_FILE]
