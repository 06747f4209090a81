"""`kimivl info`: versions, device, kernel back-ends and the model that would load.

For bug reports and "why is it slow/failing here". It never touches the network and never
fails: each probe catches everything and reports it as a finding. Probes run with stdout and
stderr captured at the file-descriptor level, since native libraries print on import.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import json
import os
import platform
import sys
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import typer

from kimivl_cli import __version__
from kimivl_cli.cli.common import DEFAULT_MODEL, DeviceOpt, JsonOpt, ModelOpt
from kimivl_cli.errors import InputError
from kimivl_cli.tasks.backend import INT8_EXPERTS_NOTE

_PACKAGES = (
    "torch",
    "safetensors",
    "tiktoken",
    "huggingface_hub",
    "bitsandbytes",
    "triton",
    "transformers",
    "pillow",
    "numpy",
    "pymupdf",
    "opencv-python-headless",
    "typer",
    "rich",
)


@contextmanager
def _captured() -> Iterator[list[str]]:
    """Swallow what native code prints on fds 1 and 2; the text is handed back afterwards."""
    out: list[str] = []
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    with tempfile.TemporaryFile() as sink:
        os.dup2(sink.fileno(), 1)
        os.dup2(sink.fileno(), 2)
        try:
            yield out
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            os.close(saved[0])
            os.close(saved[1])
            sink.seek(0)
            out.append(sink.read().decode(errors="replace"))


def _probe(check: Callable[[], str]) -> dict[str, Any]:
    """{"ok": bool, "detail": str}; any exception (even SystemExit from a library) is a finding."""
    with _captured() as printed:
        try:
            return {"ok": True, "detail": check()}
        except (Exception, SystemExit) as exc:  # a probe must never take `info` down
            detail = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"
    noise = printed[0].strip().splitlines() if printed else []
    return {"ok": False, "detail": detail.rstrip(": ") + (f" ({noise[-1]})" if noise else "")}


def _versions() -> dict[str, str | None]:
    found: dict[str, str | None] = {"kimivl": __version__, "python": platform.python_version()}
    for name in _PACKAGES:
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            found[name] = None
    return found


def _physical_memory_gib() -> float | None:
    try:
        return round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    except (ValueError, OSError, AttributeError):
        return None


def _devices(requested: str) -> dict[str, Any]:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    found: dict[str, Any] = {
        "requested": requested,
        "cpu": {
            "name": platform.processor() or platform.machine(),
            "cores": cores,
            "memory_gib": _physical_memory_gib(),
        },
        "cuda": None,
        "gpus": [],
    }

    def cuda() -> str:
        import torch

        if not torch.cuda.is_available():
            return f"not available (torch {torch.__version__}, built for CUDA {torch.version.cuda or 'none'})"
        for i in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(i)
            free, total = torch.cuda.mem_get_info(i)
            found["gpus"].append(
                {
                    "index": i,
                    "name": props.name,
                    "capability": f"{props.major}.{props.minor}",
                    "memory_gib": round(total / 2**30, 1),
                    "free_gib": round(free / 2**30, 1),
                }
            )
        return f"CUDA {torch.version.cuda}, {torch.cuda.device_count()} GPU(s)"

    found["cuda"] = _probe(cuda)
    has_gpu = bool(found["gpus"])
    found["selected"] = "cuda" if requested == "cuda" or (requested == "auto" and has_gpu) else "cpu"
    if requested == "cuda" and not has_gpu:
        found["selected_problem"] = "--device cuda was asked for but no CUDA GPU is usable"
    return found


def _bitsandbytes(has_gpu: bool) -> str:
    import bitsandbytes as bnb

    if not has_gpu:
        return f"{bnb.__version__} imports; no CUDA GPU, so its 4-bit kernels are not used"
    import torch
    from bitsandbytes.functional import dequantize_4bit, quantize_4bit

    weight = torch.randn(64, 64, device="cuda", dtype=torch.float16)
    packed, state = quantize_4bit(weight, quant_type="nf4")
    error = (dequantize_4bit(packed, state) - weight).abs().max().item()
    if not error < 0.5:
        raise RuntimeError(f"NF4 round trip is off by {error:.3f}")
    return f"{bnb.__version__}: NF4 quantize/dequantize round trip on the GPU works (max error {error:.3f})"


def _triton(has_gpu: bool) -> str:
    import triton

    if not has_gpu:
        return f"{triton.__version__} imports; no GPU, so kernels run only in interpreter mode (tests)"
    target = triton.runtime.driver.active.get_current_target()
    return f"{triton.__version__}: driver ready for {target.backend} {target.arch}"


def _cpu_kernels() -> str:
    from kimivl_cli.kernels.cpu import describe  # measures once per machine (cached), then reads the cache

    return describe()


def model_location(model: str, hub_cache: str | None = None) -> dict[str, Any]:
    """Where `model` would load from: a folder, or a snapshot in the Hub cache (`hub_cache`,
    default `HF_HUB_CACHE`, i.e. `$HF_HOME/hub`). Looks only at the disk, never the network."""
    found: dict[str, Any] = {"model": model, "default": model == DEFAULT_MODEL}
    try:
        from huggingface_hub import constants

        found["hf_home"] = constants.HF_HOME
        found["hub_cache"] = hub_cache or constants.HF_HUB_CACHE
    except Exception as exc:
        found["hub_cache"] = hub_cache
        found["hub_cache_problem"] = f"{type(exc).__name__}: {exc}"
    from kimivl_cli.model.hub import is_repo_id

    folder = Path(model).expanduser()
    if folder.is_dir():
        found.update(source="folder", path=str(folder.resolve()), **_readiness(folder))
        return found
    if folder.exists() or not is_repo_id(model):
        what = "a file" if folder.exists() else "no such folder"
        found.update(source="invalid", ready=False, problem=f"{what}: neither a checkpoint folder nor a Hub repo id")
        return found
    found["source"] = "hub"
    owner, name = model.split("/")
    repo = Path(found["hub_cache"] or "") / f"models--{owner}--{name}"
    snapshots = sorted((repo / "snapshots").glob("*/config.json"), key=lambda p: p.stat().st_mtime)
    found["path"] = str(snapshots[-1].parent) if snapshots else None
    if snapshots:
        found["cached_gib"] = round(sum(f.stat().st_size for f in (repo / "blobs").glob("*")) / 2**30, 2)
        found.update(_readiness(snapshots[-1].parent))
    else:
        found["ready"] = False
        found["problem"] = f"not in the cache; run `hf download {model}` (kimivl downloads it on first use when online)"
    return found


def _readiness(folder: Path) -> dict[str, Any]:
    """{"ready": True} when the folder has a config and safetensors weights, else why not."""
    from kimivl_cli.errors import CheckpointError
    from kimivl_cli.model.weights import checkpoint_files

    if not (folder / "config.json").is_file():
        return {"ready": False, "problem": f"{folder} has no config.json: not a checkpoint folder"}
    try:
        checkpoint_files(folder)
    except CheckpointError as exc:
        return {"ready": False, "problem": exc.one_line()}
    return {"ready": True}


def gather(model: str, device: str) -> dict[str, Any]:
    """Everything `info` reports, as one JSON-ready dict."""
    devices = _devices(device)
    has_gpu = bool(devices["gpus"])
    return {
        "versions": _versions(),
        "platform": platform.platform(),
        "device": devices,
        "bitsandbytes": _probe(lambda: _bitsandbytes(has_gpu)),
        "triton": _probe(lambda: _triton(has_gpu)),
        "cpu_kernels": _probe(_cpu_kernels),
        "model": {**(found := model_location(model)), **_auto_quant(found, devices["selected"])},
        "quant_int8": INT8_EXPERTS_NOTE.removeprefix("--quant int8 "),
    }


def _auto_quant(found: dict[str, Any], device: str) -> dict[str, Any]:
    """What `--quant auto` picks for a model on disk, and why (config only, nothing loaded)."""
    if not found.get("ready") or device not in ("cpu", "cuda"):
        return {}
    try:
        import torch

        from kimivl_cli.model.config import KimiVLConfig
        from kimivl_cli.model.weights import choose_quant

        mode, why = choose_quant(KimiVLConfig.from_file(Path(found["path"]) / "config.json"), torch.bfloat16, device)
    except Exception as exc:  # a broken config is reported, not fatal to `info`
        return {"quant_auto_problem": f"{type(exc).__name__}: {exc}"}
    return {"quant_auto": mode, "quant_auto_reason": why}


def _text(info: dict[str, Any]) -> str:
    versions = info["versions"]
    device = info["device"]
    model = info["model"]
    lines = [
        f"kimivl {versions['kimivl']}, Python {versions['python']} on {info['platform']}",
        "packages: " + ", ".join(f"{k} {v or 'missing'}" for k, v in versions.items() if k not in ("kimivl", "python")),
        f"cpu: {device['cpu']['cores']} cores, {device['cpu']['memory_gib']} GiB",
        f"cuda: {device['cuda']['detail']}",
    ]
    lines += [
        f"gpu {g['index']}: {g['name']} (sm {g['capability']}), {g['memory_gib']} GiB, {g['free_gib']} GiB free"
        for g in device["gpus"]
    ]
    problem = f" ({device['selected_problem']})" if "selected_problem" in device else ""
    lines.append(f"device: {device['selected']} (--device {device['requested']}){problem}")
    for name in ("bitsandbytes", "triton"):
        lines.append(f"{name}: {'ok' if info[name]['ok'] else 'FAILED'}, {info[name]['detail']}")
    kernels = info["cpu_kernels"]
    lines.append(
        "cpu kernels: "
        + ("\n  ".join(kernels["detail"].splitlines()) if kernels["ok"] else f"FAILED, {kernels['detail']}")
    )
    where = model.get("path") or model.get("problem", "")
    state = "ready" if model["ready"] else "not ready"
    lines.append(f"model: {model['model']} ({model['source']}, {state}): {where}")
    if "quant_auto" in model:
        lines.append(f"--quant auto: {model['quant_auto']} ({model['quant_auto_reason']})")
    lines.append(f"--quant int8: {info['quant_int8']}")
    if model.get("hub_cache"):
        lines.append(f"hub cache: {model['hub_cache']} (HF_HOME={model['hf_home']})")
    return "\n".join(lines)


def info_command(model: ModelOpt = DEFAULT_MODEL, device: DeviceOpt = "auto", as_json: JsonOpt = False) -> None:
    """Show versions, the device, whether bitsandbytes and triton work, and the model that would load.

    Offline: looks at the local Hub cache only. Example: kimivl info --json
    """
    if device not in ("auto", "cuda", "cpu"):
        raise InputError(f"unknown --device {device!r}", "use auto, cuda or cpu")
    info = gather(model, device)
    typer.echo(json.dumps(info, indent=2) if as_json else _text(info))
    if info["model"]["source"] == "invalid":
        raise InputError(f"--model {model}: {info['model']['problem']}", "pass a checkpoint folder or owner/name")


def register(app: typer.Typer) -> None:
    app.command("info")(info_command)
