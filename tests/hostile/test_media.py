"""Hostile media: bombs past the pixel budget (multi-page TIFF, GIF, PNG headers, video frames),
FIFOs in folders, endless pipes, PDF page trees that loop. Each is refused from its headers, in
milliseconds and without the memory decoding would take (measured: the process's peak RSS)."""

from __future__ import annotations

import io
import os
import struct
import threading
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from kimivl_cli.media.images import MAX_INPUT_PIXELS
from tests.hostile.conftest import peak_rss, refused
from tests.media.conftest import png_header_only

ASK = ("ask", "--max-tokens", "1", "--device", "cpu", "--model")


def _pdf(objects: list[bytes]) -> bytes:
    """A minimal PDF with these objects (1 0 obj is the catalog), offsets computed."""
    out, offsets = b"%PDF-1.4\n", []
    for number, body in enumerate(objects, 1):
        offsets.append(len(out))
        out += f"{number} 0 obj\n".encode() + body + b"\nendobj\n"
    xref = len(out)
    out += f"xref\n0 {len(objects) + 1}\n0000000000 65535 f \n".encode()
    out += b"".join(f"{o:010d} 00000 n \n".encode() for o in offsets)
    return out + f"trailer\n<< /Size {len(objects) + 1} /Root 1 0 R >>\nstartxref\n{xref}\n%%EOF\n".encode()


def _tiff(path: Path, pages: int, side: int) -> Path:
    """`pages` bilevel pages of side x side, CCITT G4: a few KB on disk, 4 bytes a pixel once decoded (Pillow's RGB)."""
    images = [Image.new("1", (side, side), 0) for _ in range(pages)]
    images[0].save(path, save_all=True, append_images=images[1:], compression="group4")
    return path


@pytest.fixture(scope="session")
def bombs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("bombs")
    _tiff(root / "pages.tif", 20, 4000)  # 20 x 16 MP = 320 MP in ~20 KB: the 613 KB server bomb
    (root / "huge.png").write_bytes(png_header_only(100_000, 100_000))
    Image.new("P", (2, 2)).save(root / "small.gif")
    gif = bytearray((root / "small.gif").read_bytes())
    gif[6:10] = struct.pack("<HH", 60000, 60000)  # the logical screen: 60000 x 60000
    (root / "huge.gif").write_bytes(bytes(gif))
    Image.new("RGB", (8, 8), (9, 9, 9)).save(root / "ok.png")
    return root


@pytest.fixture(scope="session")
def huge_video(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One 10240 x 10240 MJPEG frame (105 MP, over the 100 MP frame limit): ~0.6 MB, ~2 s to encode."""
    import cv2

    path = tmp_path_factory.mktemp("video") / "huge.avi"
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 1, (10240, 10240))
    writer.write(np.zeros((10240, 10240, 3), np.uint8))
    writer.release()
    return path


# --- 2. one pixel budget per input, from the headers -------------------------------------------------


def test_multi_page_tiff_over_the_budget_is_refused_before_decoding(bombs: Path) -> None:
    run = peak_rss("inspect", bombs / "pages.tif")
    line = refused(run, "20 pages of 320 MP together", "200 MP budget per input")
    baseline = peak_rss("inspect", bombs / "ok.png")  # the same command on an 8x8 PNG
    assert baseline.returncode == 0, baseline.stderr
    # Decoding the pages would hold 20 x 48 MB; refused from the headers, the process stays small.
    assert run.peak_mb < baseline.peak_mb + 64, (run.peak_mb, baseline.peak_mb, line)


def test_pages_within_the_budget_stay_within_it(tmp_path: Path, bombs: Path) -> None:
    """12 pages of 4000 x 4000 (192 MP, under 200): decoded, and the process grows by about what the
    stated budget allows (Pillow holds RGB at 4 bytes a pixel), not more."""
    path = _tiff(tmp_path / "twelve.tif", 12, 4000)
    run = peak_rss("inspect", path, "--json")
    assert run.returncode == 0, run.stderr
    baseline = peak_rss("inspect", bombs / "ok.png")
    budget_mb = MAX_INPUT_PIXELS * 4 / 2**20
    assert run.peak_mb - baseline.peak_mb < budget_mb * 1.1, (run.peak_mb, baseline.peak_mb)


@pytest.mark.parametrize(("name", "needle"), [("huge.png", "over the 100 MP limit"), ("huge.gif", "MP")])
def test_image_headers_over_the_limit(kimivl, bombs: Path, name: str, needle: str) -> None:
    refused(kimivl("inspect", bombs / name), needle)


def test_server_style_first_page_only_is_within_budget(bombs: Path) -> None:
    """`serve` keeps one page per image part: it reads only that page's header and pixels."""
    from kimivl_cli.media.images import load_images

    pages = load_images(bombs / "pages.tif", max_pages=1)
    assert len(pages) == 1 and pages[0].size == (4000, 4000)


def test_video_frames_over_the_limit_are_refused_before_decoding(kimivl, huge_video: Path, bombs: Path) -> None:
    run = peak_rss("inspect", huge_video)
    refused(run, "10240x10240 is 105 MP, over the 100 MP limit")
    baseline = peak_rss("inspect", bombs / "ok.png")
    assert run.peak_mb < baseline.peak_mb + 64, (run.peak_mb, baseline.peak_mb)
    refused(kimivl("video-scenes", huge_video, "--shots-only"), "over the 100 MP limit")


def test_frames_kept_from_one_video_share_the_budget(tmp_path: Path) -> None:
    """64 sampled frames of 4000 x 1000 (256 MP) exceed the per-input budget: refused before decoding."""
    import cv2

    from kimivl_cli.media.video import VideoFile

    path = tmp_path / "wide.avi"
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 25, (4000, 1000))
    frame = np.zeros((1000, 4000, 3), np.uint8)
    for _ in range(64):
        writer.write(frame)
    writer.release()
    with VideoFile(path) as video:
        with pytest.raises(Exception) as info:
            video.sample(count=64)
        assert "64 frames of 256 MP together, over the 200 MP budget" in info.value.one_line()
        assert len(video.sample(count=40)) == 40  # 160 MP: within it
        small = video.read(list(range(64)), max_side=896)  # shrunk as decoded: 64 x 0.2 MP
        assert {f.image.shape for f in small} == {(224, 896, 3)}


@pytest.mark.parametrize("fps", ["inf", "1e309"])
def test_infinite_frame_rates(kimivl, tiny_checkpoint: Path, tmp_path: Path, fps: str) -> None:
    import cv2

    path = tmp_path / "clip.avi"
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 25, (32, 32))
    for i in range(10):
        writer.write(np.full((32, 32, 3), i * 20, np.uint8))
    writer.release()
    refused(kimivl(*ASK, tiny_checkpoint, path, "--fps", fps, "What?"), "finite")
    refused(kimivl("video-scenes", path, "--shots-only", "--fps", fps), "finite")


# --- 9. FIFOs and other files that are not files ------------------------------------------------------


def test_a_fifo_in_a_folder_is_skipped_with_a_note_never_opened(kimivl, tmp_path: Path, bombs: Path) -> None:
    folder = tmp_path / "scans"
    folder.mkdir()
    os.mkfifo(folder / "a-pipe.png")  # opening it would wait for a writer forever
    Image.open(bombs / "ok.png").save(folder / "page.png")
    (folder / "loop.png").symlink_to("loop.png")  # a link to itself
    for command in (("inspect",), ("ocr", "--method", "text")):
        result = kimivl(*command, folder)
        notes = [line for line in result.stderr.splitlines() if line.startswith("note: skipped")]
        assert len(notes) == 2 and "a-pipe.png" in "".join(notes) and "not a regular file" in notes[0], result.stderr
        assert result.returncode == 0, result.stderr
    (folder / "page.png").unlink()
    refused(kimivl("inspect", folder), "no supported files in this folder")
    refused(kimivl("video-scenes", folder, "--shots-only"), "no supported files")


def test_a_named_pipe_is_read_once_like_stdin(kimivl, tmp_path: Path, bombs: Path) -> None:
    """`kimivl inspect <(cat page.png)`: a pipe named on purpose is read, once, not sniffed and reopened."""
    fifo = tmp_path / "fd63"
    os.mkfifo(fifo)
    data = (bombs / "ok.png").read_bytes()

    def writer() -> None:
        with open(fifo, "wb") as fh:
            fh.write(data)

    threading.Thread(target=writer, daemon=True).start()
    result = kimivl("inspect", fifo)
    assert result.returncode == 0 and "8x8" in result.stdout, result.stderr


def test_endless_devices_and_pipes_end_with_a_message(kimivl) -> None:
    refused(kimivl("inspect", "/dev/zero"), "not a file type kimivl reads")
    buffer = io.BytesIO()
    Image.new("RGB", (4, 4)).save(buffer, "PNG")
    endless = buffer.getvalue() + b"\0" * (300 << 20)  # a PNG, then more than stdin may hold
    run = peak_rss("inspect", "-", stdin=endless)
    refused(run, "stdin gives more than 256 MiB", "save it to a file")


# --- PDFs whose structure loops ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("objects", "needle"),
    [
        (
            [
                b"<< /Type /Catalog /Pages 2 0 R >>",
                b"<< /Type /Pages /Kids [2 0 R 3 0 R] /Count 2 >>",  # the tree lists itself
                b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 200 200] >>",
            ],
            "cycle in page tree",
        ),
        (
            [
                b"<< /Type /Catalog /Pages 2 0 R >>",
                b"<< /Type /Pages /Kids [4 0 R] /Count 1 >>",
                b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 200 200] >>",
                b"<< /Type /Pages /Kids [2 0 R] /Count 1 /Parent 2 0 R >>",  # a loop through two nodes
            ],
            "cycle in page tree",
        ),
        (
            [
                b"<< /Type /Catalog /Pages 2 0 R >>",
                b"<< /Type /Pages /Kids [2 0 R 3 0 R] /Count 1000000000 >>",
                b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 200 200] >>",
            ],
            "broken page tree",
        ),
    ],
)
def test_pdf_page_trees_that_loop(
    kimivl, tiny_checkpoint: Path, tmp_path: Path, objects: list[bytes], needle: str
) -> None:
    path = tmp_path / "loop.pdf"
    path.write_bytes(_pdf(objects))
    refused(kimivl("inspect", path), needle)
    refused(kimivl("ocr", "--method", "text", path), needle)
    refused(kimivl(*ASK, tiny_checkpoint, path, "What?"), needle)
