"""`kimivl ocr` with the real engine on a generated tiny checkpoint (random weights: garbage text).

One subprocess covers the model path end to end (a PDF range read with --method vision and a
scanned page as a PNG); resume and the garbage-text handling run in-process.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from ocr_helpers import ROOT
from PIL import Image
from typer.testing import CliRunner

from kimivl_cli.cli import app
from kimivl_cli.tasks.ocr import Generation, OcrOptions, PageJob
from kimivl_cli.tasks.ocr.pipeline import RunSummary, prepare_page
from kimivl_cli.tasks.ocr.postprocess import EMPTY_PAGE_NOTE


@pytest.fixture(scope="module")
def scanned_page(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """scikit-image's scanned book page (no text layer), as a PNG."""
    data = pytest.importorskip("skimage.data")
    path = tmp_path_factory.mktemp("scan") / "page.png"
    Image.fromarray(data.page()).save(path)
    return path


def test_model_run_then_resume(tiny_checkpoint: Path, libtasn1_pdf: Path, scanned_page: Path, tmp_path: Path) -> None:
    out = tmp_path / "out.jsonl"
    args = ["ocr", str(libtasn1_pdf), str(scanned_page), "--pages", "1-3", "--jsonl", "--method", "vision"]
    args += [
        "--max-tokens",
        "4",
        "--max-side",
        "280",
        "--model",
        str(tiny_checkpoint),
        "--device",
        "cpu",
        "-o",
        str(out),
    ]
    first = subprocess.run(
        [sys.executable, "-m", "kimivl_cli", *args], capture_output=True, text=True, timeout=300, cwd=ROOT
    )
    assert first.returncode == 0, first.stderr
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(Path(r["file"]).name, r["page"], r["method"]) for r in records] == [
        ("libtasn1.pdf", 1, "vision"),
        ("libtasn1.pdf", 2, "vision"),
        ("libtasn1.pdf", 3, "vision"),
        ("page.png", 1, "vision"),
    ]
    assert all(r["markdown"].strip() and r["tokens"] > 0 for r in records)  # garbage or the empty-page note
    # The same command resumed: everything is there, so the model is never loaded.
    again = CliRunner().invoke(app, [*args, "--resume"])
    assert again.exit_code == 0, again.output
    assert "0 pages written" in again.output and "4 already there" in again.output
    assert len(out.read_text().splitlines()) == 4


@settings(max_examples=60, deadline=None)
@given(answer=st.text(alphabet=st.characters(codec="utf-8"), max_size=200))
def test_any_model_text_gives_a_page(answer: str) -> None:
    job = PageJob("scan.png", 1, image=_ink_image())
    options = OcrOptions(method="vision")
    record = prepare_page(job, options).finish(
        lambda messages, images: Generation(answer, 10, 3), options, RunSummary()
    )
    assert record.method == "vision" and record.markdown.strip()
    assert record.tokens == 13


def test_empty_answer_keeps_the_page_with_a_note() -> None:
    job = PageJob("scan.png", 1, image=_ink_image())
    for answer in ["", "   \n", "```markdown\n```"]:
        options = OcrOptions(method="vision")
        record = prepare_page(job, options).finish(lambda messages, images, a=answer: a, options, RunSummary())
        assert record.markdown == EMPTY_PAGE_NOTE, answer


def _ink_image() -> Image.Image:
    """A page with some ink on it, so blank-page detection lets it through to the model."""
    image = Image.new("RGB", (112, 84), "white")
    for x in range(10, 100, 3):
        for y in range(20, 60):
            image.putpixel((x, y), (0, 0, 0))
    return image


def test_answer_only_keeps_the_answer_and_the_usage(monkeypatch: pytest.MonkeyPatch) -> None:
    """The seam over the engine: reasoning dropped, answer joined, token counts from Done.usage,
    the command's sampling options passed on, the engine opened on the first page only."""
    from kimivl_cli.backends import AnswerOnly, ChatOptions
    from kimivl_cli.engine.events import AnswerDelta, Done, ThinkingDelta, Usage
    from kimivl_cli.engine.sampling import SamplingParams
    from kimivl_cli.tasks import backend

    class StubEngine:
        defaults = SamplingParams()

        def generate(self, messages, images, params, show_thinking=True, max_context=None):
            self.params = params
            yield ThinkingDelta("let me look")
            yield AnswerDelta("# Title")
            yield AnswerDelta("\nbody")
            yield Done(usage=Usage(prompt_tokens=120, image_tokens=80, thinking_tokens=5, answer_tokens=4))

    engine = StubEngine()
    opened: list[tuple] = []
    monkeypatch.setattr(backend, "open_engine", lambda *args: opened.append(args) or engine)
    local = backend.open_backend("local", "ckpt", "cpu", "nf4")
    generate = AnswerOnly(local, ChatOptions(max_tokens=7, temperature=0.0, thinking_budget=3))
    assert opened == []
    result = generate([{"role": "user", "content": [{"type": "image"}]}], [Image.new("RGB", (8, 8))])
    assert result == Generation("# Title\nbody", 120, 9)
    assert opened == [("ckpt", "cpu", "nf4")]
    assert (engine.params.max_new_tokens, engine.params.temperature, engine.params.thinking_budget) == (7, 0.0, 3)
