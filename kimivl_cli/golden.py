"""Check a checkpoint against reference goldens, stage by stage.

    python -m kimivl_cli.golden DIR [--golden FILE] [--json] [--device cpu]

DIR is a checkpoint folder (single-file or sharded); FILE (default `DIR/golden.safetensors`) holds the
reference inputs and outputs laid out as in `shared/golden/README.md`. The model is loaded in fp32 and
every stage recorded in FILE is recomputed and compared: max absolute error for activations, the
count of differing entries for the exact stages (router choices, greedy ids). Exit 0 when every stage
is within tolerance, 1 when one is not, 2 for a bad folder or golden file.
"""

from __future__ import annotations

import json
import math
import re
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Annotated, Optional

import torch
import typer
from safetensors import SafetensorError
from safetensors.torch import load_file

from kimivl_cli.errors import CheckpointError, KimivlError
from kimivl_cli.model.cache import LatentCache
from kimivl_cli.model.kimivl import KimiVL
from kimivl_cli.model.weights import load_model
from kimivl_cli.testing.stages import record_stages

INPUTS = ("input_ids", "attention_mask", "pixel_values", "image_grid_hws")
# Pipeline order of the stages (a golden key is `stage` or `stage.<suffix>`).
STAGES = (
    "vision_pos_emb",
    "vision_patch_embed",
    "vision_encoder_out",
    "vision_tower_out",
    "projector_out",
    "hidden_states",
    "router_topk_idx",
    "router_topk_weight",
    "logits",
    "decode_step_logits",
    "generated_ids",
)
EXACT = ("router_topk_idx", "generated_ids")
VISION_ATOL = 2e-5  # vision tower and projector (fp32 vs fp32 reference: observed <= 7.5e-6)
ATOL = 1e-4  # language model activations and logits


def tolerance(key: str) -> float:
    """0 for exact stages, else the max absolute error allowed."""
    stage = key.split(".")[0].split("[")[0]
    if stage in EXACT:
        return 0.0
    return VISION_ATOL if stage.startswith("vision_") or stage == "projector_out" else ATOL


@dataclass
class Check:
    stage: str
    shape: list[int]
    error: float | None  # max |got - want|, or mismatching entries for exact stages; None when skipped
    tolerance: float
    note: str = ""

    @property
    def status(self) -> str:
        if self.error is None:
            return "skipped"
        return "ok" if self.error <= self.tolerance else "FAIL"


def compare(stage: str, got: torch.Tensor | None, want: torch.Tensor) -> Check:
    tol = tolerance(stage)
    shape = list(want.shape)
    if got is None:
        return Check(stage, shape, None, tol, "not computed by this model")
    got = got.detach().cpu()
    if list(got.shape) != shape:
        return Check(stage, shape, math.inf, tol, f"shape {list(got.shape)}")
    if tol == 0:
        return Check(stage, shape, float((got != want).sum()), tol)
    return Check(stage, shape, float((got.double() - want.double()).abs().max()) if want.numel() else 0.0, tol)


def _order(key: str) -> tuple[int, list[int]]:
    stage = key.split(".")[0]
    rank = STAGES.index(stage) if stage in STAGES else len(STAGES)
    return rank, [int(n) for n in re.findall(r"\d+", key.removeprefix(stage))]


@torch.no_grad()
def run_stages(model: KimiVL, golden: dict[str, torch.Tensor], device: str) -> dict[str, torch.Tensor]:
    """One full forward (its stages recorded) and a cached greedy decode; returns tensors named like the
    golden keys."""
    ids = golden["input_ids"].to(device)
    pixels = golden["pixel_values"].to(device) if "pixel_values" in golden else None
    grids = golden["image_grid_hws"] if pixels is not None else None
    with record_stages(model) as stages:
        logits = model(ids, pixels, grids)
    got = {**stages, "logits": logits}
    if "generated_ids" in golden:
        got["generated_ids"], got["decode_step_logits"] = greedy(
            model, ids, pixels, grids, len(golden["generated_ids"])
        )
    return got


def greedy(
    model: KimiVL, ids: torch.Tensor, pixels: torch.Tensor | None, grids: torch.Tensor | None, n: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Prefill then one cached step per token, as the reference decoded: ids [n], logits rows [n, V]."""
    n_prompt = ids.shape[1]
    cache = LatentCache(model.config.text, batch=1, max_len=n_prompt + n, dtype=torch.float32, device=ids.device)
    logits = model(ids, pixels, grids, cache=cache)[:, -1]
    tokens, rows = [], []
    for step in range(n):
        rows.append(logits[0])
        tokens.append(logits.argmax(-1))
        if step + 1 < n:
            logits = model(tokens[-1][:, None], positions=n_prompt + step, cache=cache)[:, -1]
    return torch.cat(tokens), torch.stack(rows)


def read_golden(folder: Path, golden: Path | None) -> tuple[Path, dict[str, torch.Tensor]]:
    path = golden or folder / "golden.safetensors"
    if not path.is_file():
        raise CheckpointError(
            f"no golden file {path}",
            "pass --golden FILE; a sharded copy uses its source's file, e.g. tiny-a/golden.safetensors for tiny-a-sharded",
        )
    try:
        tensors = load_file(path)
    except (SafetensorError, OSError) as exc:
        raise CheckpointError(f"{path}: not a readable safetensors file ({exc})") from None
    if "input_ids" not in tensors:
        raise CheckpointError(f"{path}: no input_ids tensor", "this is not a model golden file")
    return path, tensors


def check(folder: Path, golden: Path | None = None, device: str = "cpu") -> tuple[Path, list[Check]]:
    """Every stage recorded in the golden file, in pipeline order."""
    if not folder.is_dir():
        raise CheckpointError(f"{folder} is not a folder", "pass a checkpoint folder containing config.json")
    golden_path, reference = read_golden(folder, golden)
    model, _ = load_model(folder, dtype=torch.float32, device=device)
    got = run_stages(model, reference, device)
    checks = []
    for key in sorted((k for k in reference if k not in INPUTS), key=_order):
        want = reference[key]
        if key == "hidden_states":  # one row per layer boundary, to point at the layer that drifts
            checks += [compare(f"{key}[{i}]", got.get(key, [None] * len(want))[i], w) for i, w in enumerate(want)]
        else:
            checks.append(compare(key, got.get(key), want))
    return golden_path, checks


def _text_report(folder: Path, golden: Path, checks: list[Check]) -> str:
    lines = [f"checkpoint {folder}", f"golden     {golden}", ""]
    width = max(len(c.stage) for c in checks)
    lines.append(f"{'stage':<{width}}  {'shape':<16}  {'error':>9}  {'tolerance':>9}  status")
    for c in checks:
        error = "-" if c.error is None else f"{c.error:.0f} diff" if c.tolerance == 0 else f"{c.error:.2e}"
        tol = "exact" if c.tolerance == 0 else f"{c.tolerance:.0e}"
        note = f"  ({c.note})" if c.note else ""
        lines.append(f"{c.stage:<{width}}  {c.shape!s:<16}  {error:>9}  {tol:>9}  {c.status}{note}")
    failed = [c.stage for c in checks if c.status == "FAIL"]
    skipped = sum(c.status == "skipped" for c in checks)
    lines.append("")
    lines.append(
        f"FAIL: {len(failed)} of {len(checks)} stages exceed tolerance: {', '.join(failed)}"
        if failed
        else f"ok: {len(checks) - skipped} stages within tolerance" + (f", {skipped} skipped" if skipped else "")
    )
    return "\n".join(lines)


app = typer.Typer(add_completion=False, pretty_exceptions_enable=False, rich_markup_mode=None)


@app.command()
def main(
    folder: Annotated[Path, typer.Argument(help="Checkpoint folder (config.json + safetensors).")],
    golden: Annotated[
        Optional[Path], typer.Option("--golden", help="Golden file (default: FOLDER/golden.safetensors).")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object instead of text.")] = False,
    device: Annotated[str, typer.Option("--device", help="cpu or cuda.")] = "cpu",
) -> None:
    """Recompute every stage recorded in the golden file and report its max absolute error."""
    try:
        golden_path, checks = check(folder, golden, device)
    except KimivlError as exc:
        print(f"error: {exc.one_line()}", file=sys.stderr)
        raise typer.Exit(exc.exit_code) from None
    ok = all(c.status != "FAIL" for c in checks)
    if as_json:
        stages = [{**asdict(c), "status": c.status} for c in checks]
        for s in stages:  # JSON has no infinity
            s["error"] = None if s["error"] is None or math.isinf(s["error"]) else s["error"]
        print(json.dumps({"checkpoint": str(folder), "golden": str(golden_path), "ok": ok, "stages": stages}))
    else:
        print(_text_report(folder, golden_path, checks))
    raise typer.Exit(0 if ok else 1)


if __name__ == "__main__":
    app()
