"""The commands with `--backend openai` over real HTTP on loopback: against `kimivl serve` (tiny
checkpoint, random weights: garbage text), against a flaky stub, and with a refused key."""

from __future__ import annotations

import io
import json
from collections import Counter
from pathlib import Path

import pytest

from tests.backends.conftest import API_KEY, Step, sse_chunks


def _openai(server_url: str, key: str | None = API_KEY) -> list[str]:
    return ["--backend", "openai", "--api-base", server_url, *(["--api-key", key] if key else [])]


def test_ask_through_kimivl_serve(kimivl, kimivl_server, libtasn1_pdf: Path) -> None:
    run = kimivl(
        "ask", libtasn1_pdf, "--pages", "1", "What is this?", "--json", "--max-tokens", "5", "--temperature", "0",
        *_openai(kimivl_server.url),
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    answer = json.loads(run.stdout)
    assert answer["model"] == kimivl_server.model_name
    assert answer["usage"]["prompt_tokens"] > 0 and 1 <= answer["usage"]["completion_tokens"] <= 5


def test_local_only_flags_are_named_as_ignored(kimivl, kimivl_server) -> None:
    run = kimivl("ask", "hi", "--max-tokens", "2", "--quant", "nf4", "--device", "cpu", *_openai(kimivl_server.url))
    assert run.returncode == 0, run.stderr
    assert "note: --device cpu, --quant nf4 ignored" in run.stderr


def test_chat_through_kimivl_serve(kimivl, kimivl_server, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """A piped two-question chat over HTTP (plain line mode): both answered, exit 0."""
    image = tmp_path / "ink.png"
    _ink_png(image)
    monkeypatch.setattr("sys.stdin", io.StringIO("What is written here?\nAnd again?\n"))
    run = kimivl("chat", image, "--max-tokens", "3", "--temperature", "0", *_openai(kimivl_server.url))
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() and "error" not in run.stderr


def test_ocr_concurrency_4_keeps_page_order(kimivl, kimivl_server, libtasn1_pdf: Path, tmp_path: Path) -> None:
    out = tmp_path / "pages.jsonl"
    args = ["ocr", libtasn1_pdf, "--pages", "1-6", "--method", "vision", "--max-side", "112", "--jsonl", "-o", out]
    args += ["--max-tokens", "3", "--temperature", "0", "--concurrency", "4", *_openai(kimivl_server.url)]
    run = kimivl(*args)
    assert run.returncode == 0, run.stderr
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["page"] for r in records] == [1, 2, 3, 4, 5, 6]
    assert all(r["method"] == "vision" and r["tokens"] > 0 and r["markdown"].strip() for r in records)
    again = kimivl(*args, "--resume")  # nothing left: no request is sent
    assert again.returncode == 0 and "0 pages written" in again.stderr and "6 already there" in again.stderr


def test_video_scenes_through_kimivl_serve(kimivl, kimivl_server, bikes_mp4: Path) -> None:
    run = kimivl(
        "video-scenes", bikes_mp4, "--max-frames", "4", "--max-tokens", "6", "--temperature", "0", "-f", "json",
        *_openai(kimivl_server.url),
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    doc = json.loads(run.stdout)
    assert [s["start_frame"] for s in doc["scenes"]] == [0, 30, 76, 137, 187, 242]
    assert "the model's answer had no usable scenes" in run.stderr  # random weights: the shots stand


def test_refused_key_is_one_error_line_and_exit_1(kimivl, kimivl_server, tmp_path: Path) -> None:
    image = tmp_path / "ink.png"
    _ink_png(image)
    for key in ("wrong-key", None):
        run = kimivl("ocr", image, *_openai(kimivl_server.url, key))
        assert run.returncode == 1, run.stderr
        assert run.stderr.startswith("error: ") and run.stderr.count("\n") == 1 and "KIMIVL_API_KEY" in run.stderr
        assert run.stdout == ""


def test_openai_without_api_base_is_a_usage_error(kimivl, tmp_path: Path) -> None:
    run = kimivl("ask", "hello?", "--backend", "openai")
    assert run.returncode == 2 and run.stderr.startswith("error: ") and "--api-base" in run.stderr


@pytest.mark.parametrize("failure", [Step(500), Step(429, headers={"Retry-After": "0"}), Step(drop=True)])
def test_flaky_server_is_retried_and_the_job_completes(kimivl, fake_server, tmp_path: Path, failure: Step) -> None:
    """The first two requests to each route fail (a status, or the connection dropped), then it answers."""
    answer = "# Page\n\nflaky but fine"
    ok = Step(chunks=sse_chunks({"content": answer}, usage={"prompt_tokens": 7, "completion_tokens": 4}))
    server = fake_server([failure, failure, ok], model_steps=[failure, failure, Step()])
    images = [tmp_path / f"scan{i}.png" for i in range(3)]
    for image in images:
        _ink_png(image)
    out = tmp_path / "out.jsonl"
    run = kimivl("ocr", *images, "--jsonl", "-o", out, "-j", "2", *_openai(server.url, None))
    assert run.returncode == 0, run.stderr
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["file"] for r in records] == [str(p) for p in images]
    assert all(r["markdown"] == answer and r["tokens"] == 11 for r in records)
    paths = Counter(r["path"] for r in server.requests)
    assert paths == {"/v1/models": 3, "/v1/chat/completions": 5}  # 2 failures each, then 1 listing + 3 pages


def _ink_png(path: Path) -> None:
    """A small page with ink on it (blank pages never reach the model)."""
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (140, 100), "white")
    ImageDraw.Draw(image).text((10, 40), "Hello, scanned world", fill="black")
    image.save(path)
