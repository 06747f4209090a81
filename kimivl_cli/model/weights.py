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
from collections.abc import Callable
from contextlib import AbstractContextManager
from pathlib import Path
from typing import NamedTuple

import torch
from torch import nn

from kimivl_cli.errors import CheckpointError, InputError
from kimivl_cli.files import user_file_mode
from kimivl_cli.model.config import KimiVLConfig
from kimivl_cli.model.hub import is_repo_id
from kimivl_cli.model.kimivl import KimiVL
from kimivl_cli.quant.modules import quantize_linears_

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
HUB_PATTERNS = ["*.json", "*.safetensors", "tiktoken.model", "*.jinja"]
# Keys some exporters write that carry nothing we need (recomputed rotary tables).
IGNORED_KEY = re.compile(r"(^|\.)rotary_emb\.inv_freq$")
QUANT_MODES = ("none", "nf4", "int8")
# --quant auto keeps bf16 while the weights take at most this share of the device's memory
# (the rest is for activations, the cache and, on CPU, everything else running); beyond it, nf4.
AUTO_WEIGHT_SHARE = 0.7
QUANT_METADATA_KEY = "kimivl_quant"  # safetensors `__metadata__` entry of a pre-quantized checkpoint
SHARD_BYTES = 4 << 30  # shard size `save_quantized` writes


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
        raise CheckpointError(f"{text} is a file", "--model wants a checkpoint folder or a Hub repo id")
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


def checkpoint_targets(model: nn.Module, prefix: str = "", stored_quantized: bool = False) -> dict[str, Target]:
    """Every official key the model needs, with where it goes and its expected shape.

    `stored_quantized`: the checkpoint holds quantized modules' own buffers (see `save_quantized`),
    so those modules (class attribute `quantized`) are read like plain ones, not through their hook.
    """
    targets: dict[str, Target] = {}
    seen: set[int] = set()

    def walk(module: nn.Module, at: str) -> None:
        if hasattr(module, "checkpoint_tensors") and not (stored_quantized and getattr(module, "quantized", False)):
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
        self.metadata: dict[str, str] = {}
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
            self.metadata = dict(header.get("__metadata__") or {})
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


def stored_quant(files: list[SafetensorsFile]) -> str:
    """The quantization a checkpoint was saved with ("none" for an official one); shards must agree."""
    modes = {f.metadata.get(QUANT_METADATA_KEY, "none") for f in files}
    if len(modes) > 1 or not modes <= set(QUANT_MODES):
        raise CheckpointError(
            f"{files[0].path.parent}: shards disagree on or have an unknown {QUANT_METADATA_KEY!r}: {sorted(modes)}",
            "re-run `kimivl quantize` from the original checkpoint",
        )
    return modes.pop()


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
def load_checkpoint(
    model: nn.Module,
    folder: Path,
    prefix: str = "",
    progress: LoadProgress | None = None,
    description: str = "loading weights",
) -> None:
    """Stream the checkpoint in `folder` into `model`, whose root sits at official key `prefix`
    (e.g. `language_model.` to load the language model alone). Peak: one tensor + the model.
    `progress` is told the bytes to read, then each tensor's bytes once it is in place."""
    files = [SafetensorsFile(path) for path in checkpoint_files(folder)]
    targets = checkpoint_targets(model, prefix, stored_quantized=stored_quant(files) != "none")
    plan = plan_load(targets, files, prefix)
    total = sum(file.entries[key].end - file.entries[key].start for file, keys in plan.items() for key in keys)
    with (progress or _no_progress)(total, description) as advance:
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
    if quant not in (*QUANT_MODES, "auto"):
        raise InputError(f"unknown quantization {quant!r}", f"use one of auto, {', '.join(QUANT_MODES)}")
    folder = resolve_checkpoint(path_or_repo)
    config = KimiVLConfig.from_file(folder / "config.json")
    stored = stored_quant([SafetensorsFile(path) for path in checkpoint_files(folder)])
    if quant == "auto":
        quant = stored if stored != "none" else choose_quant(config, dtype, device)[0]
    if stored != "none" and quant not in ("none", stored):
        raise CheckpointError(
            f"{folder} is pre-quantized as {stored}; it cannot be loaded as {quant}",
            f"pass --quant {stored}, or quantize the original checkpoint",
        )
    with torch.device("meta"):
        model = KimiVL(config)
    try:
        quantize_linears_(model.language_model, stored if stored != "none" else quant, device)
    except ValueError as exc:  # NF4 needs inner dims in multiples of its 64-weight blocks
        raise CheckpointError(
            f"{folder} cannot be quantized as {quant}: {exc}", "use --quant int8, or no quantization"
        ) from None
    materialize(model, dtype, device)
    quantizing = f", quantizing to {quant.upper()}" if stored == "none" and quant != "none" else ""
    load_checkpoint(model, folder, progress=progress, description=f"loading {Path(str(path_or_repo)).name}{quantizing}")
    return model.eval(), config


def _is_weight_file(path: Path) -> bool:
    return path.name == INDEX_FILE or path.suffix == ".safetensors"


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
    An existing non-empty `dst` is an `InputError` unless `force`, which replaces its weight files.
    """
    from safetensors.torch import save_file

    if quant not in QUANT_MODES or quant == "none":
        raise InputError(f"cannot quantize as {quant!r}", "use --quant nf4 or --quant int8")
    if dst.exists() and (not dst.is_dir() or any(dst.iterdir())) and not force:
        raise InputError(f"{dst} already exists", "pick another destination or pass --force to replace it")
    folder = resolve_checkpoint(src)
    model, _ = load_model(folder, dtype=dtype, device="cpu", quant=quant, progress=progress)
    targets = checkpoint_targets(model, stored_quantized=True)
    if dst.is_file():
        dst.unlink()
    dst.mkdir(parents=True, exist_ok=True)
    for old in dst.iterdir():
        if _is_weight_file(old):
            old.unlink()

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
    written: list[Path] = []
    mode = user_file_mode()  # safetensors writes its files 0600
    if len(shards) == 1:
        save_file(shards[0], dst / SINGLE_FILE, metadata=metadata)
        os.chmod(dst / SINGLE_FILE, mode)
        written.append(dst / SINGLE_FILE)
    else:
        weight_map = {}
        for i, shard in enumerate(shards, 1):
            path = dst / f"model-{i:05d}-of-{len(shards):05d}.safetensors"
            save_file(shard, path, metadata=metadata)
            os.chmod(path, mode)
            weight_map.update(dict.fromkeys(shard, path.name))
            written.append(path)
        index = {
            "metadata": {"total_size": sum(t.nbytes for s in shards for t in s.values())},
            "weight_map": weight_map,
        }
        (dst / INDEX_FILE).write_text(json.dumps(index, indent=2), encoding="utf-8")
        written.append(dst / INDEX_FILE)
    for path in sorted(folder.iterdir()):
        if path.is_file() and not _is_weight_file(path) and path.suffix not in PICKLE_SUFFIXES:
            shutil.copyfile(path, dst / path.name)
            written.append(dst / path.name)
    return written
