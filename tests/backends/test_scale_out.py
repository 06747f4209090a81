"""The commands with `--backend openai` over real HTTP on loopback: against `kimivl serve` (tiny
checkpoint, random weights: garbage text), against a flaky stub, and with a refused key."""

from __future__ import annotations

import json
import threading
from collections import Counter
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any

import pytest
from conftest import API_KEY, _QuietServer, sse_chunks


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


class FlakyServer:
    """A stub OpenAI server whose first two requests to each route fail (`failure`: a status, or
    "drop" to close the connection unanswered); later ones get a canned page."""

    ANSWER = "# Page\n\nflaky but fine"

    def __init__(self, failure: int | str) -> None:
        self.seen: Counter[str] = Counter()
        self.lock = threading.Lock()
        owner = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                if not owner.fail(self):
                    self.reply(200, {"object": "list", "data": [{"id": "flaky-model", "object": "model"}]})

            def do_POST(self) -> None:
                self.rfile.read(int(self.headers["Content-Length"]))
                if owner.fail(self):
                    return
                self.send_response(200)
                self.send_header("Content-Type", "text/event-stream")
                self.send_header("Connection", "close")
                self.end_headers()
                self.close_connection = True
                for chunk in sse_chunks({"content": owner.ANSWER}, usage={"prompt_tokens": 7, "completion_tokens": 4}):
                    self.wfile.write(b"data: " + json.dumps(chunk).encode() + b"\n\n")
                self.wfile.write(b"data: [DONE]\n\n")

            def reply(self, status: int, body: dict, headers: dict[str, str] | None = None) -> None:
                payload = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(payload)

        self.failure = failure
        self.httpd = _QuietServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"

    def fail(self, handler: BaseHTTPRequestHandler) -> bool:
        """Fail this request if it is among the first two to its route; True when it was failed."""
        with self.lock:
            self.seen[handler.path] += 1
            if self.seen[handler.path] > 2:
                return False
        if self.failure == "drop":
            handler.close_connection = True
        else:
            headers = {"Retry-After": "0"} if self.failure == 429 else {}
            handler.reply(self.failure, {"error": {"message": f"flaky {self.failure}"}}, headers)  # type: ignore[attr-defined]
        return True


@pytest.mark.parametrize("failure", [500, 429, "drop"])
def test_flaky_server_is_retried_and_the_job_completes(kimivl, tmp_path: Path, failure: int | str) -> None:
    server = FlakyServer(failure)
    threading.Thread(target=server.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    try:
        images = []
        for i in range(3):
            images.append(tmp_path / f"scan{i}.png")
            _ink_png(images[-1])
        out = tmp_path / "out.jsonl"
        run = kimivl("ocr", *images, "--jsonl", "-o", out, "-j", "2", *_openai(server.url, None))
        assert run.returncode == 0, run.stderr
        records = [json.loads(line) for line in out.read_text().splitlines()]
        assert [r["file"] for r in records] == [str(p) for p in images]
        assert all(r["markdown"] == FlakyServer.ANSWER and r["tokens"] == 11 for r in records)
        assert server.seen == {"/v1/models": 3, "/v1/chat/completions": 5}  # 2 failures + 3 pages
    finally:
        server.httpd.shutdown()
        server.httpd.server_close()


def _ink_png(path: Path) -> None:
    """A small page with ink on it (blank pages never reach the model)."""
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (140, 100), "white")
    ImageDraw.Draw(image).text((10, 40), "Hello, scanned world", fill="black")
    image.save(path)
