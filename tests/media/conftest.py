"""Media fixtures: real files from scikit-image, and generated edge cases written once per session."""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from kimivl_cli.errors import InputError
from tests.conftest import packaged_file
from tests.video.conftest import synthetic_clip  # noqa: F401  (fixture: a clip with every transition, for stream tests)


def skimage_file(name: str) -> Path:
    return packaged_file("scikit-image", f"skimage/data/{name}")


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height RGB but whose pixel data is a few bytes:
    decoding it would fail as truncated, so only a header check can give the size error."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 16)) + chunk(b"IEND", b"")
    )


def encoded(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


@pytest.fixture(scope="session")
def media_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Generated edge cases, named by what they are (the extension is only for people)."""
    root = tmp_path_factory.mktemp("media")
    # A 40x20 landscape stored with EXIF orientation 6 (rotate 90 clockwise to display): upright is 20x40.
    stored = Image.new("RGB", (40, 20), (0, 0, 255))
    stored.paste((255, 0, 0), (0, 0, 10, 20))  # red band on the left of the stored pixels
    exif = Image.Exif()
    exif[0x0112] = 6
    (root / "rotated.jpg").write_bytes(encoded(stored, "JPEG", exif=exif.tobytes(), quality=95))
    rgba = Image.new("RGBA", (8, 8), (10, 200, 30, 255))
    rgba.putpixel((0, 0), (200, 100, 50, 0))  # fully transparent, colour kept
    (root / "rgba.png").write_bytes(encoded(rgba, "PNG"))
    (root / "cmyk.jpg").write_bytes(encoded(Image.new("CMYK", (16, 16), (0, 255, 255, 0)), "JPEG", quality=95))
    grey16 = np.array([[0, 257 * 128, 65535]], dtype=np.uint16)
    (root / "grey16.png").write_bytes(encoded(Image.fromarray(grey16), "PNG"))
    (root / "one.png").write_bytes(encoded(Image.new("RGB", (1, 1), (1, 2, 3)), "PNG"))
    (root / "square.png").write_bytes(png_header_only(100, 100))
    (root / "bomb.png").write_bytes(png_header_only(20000, 20000))
    pages = [Image.new("RGB", (12, 9), colour) for colour in ((255, 0, 0), (0, 255, 0), (0, 0, 255))]
    (root / "pages.tif").write_bytes(encoded(pages[0], "TIFF", save_all=True, append_images=pages[1:]))
    palette = Image.new("P", (4, 4), 1)
    palette.putpalette([0, 0, 0, 255, 255, 0] + [0] * 762)
    (root / "palette.gif").write_bytes(encoded(palette, "GIF", transparency=0))
    (root / "photo.webp").write_bytes(encoded(Image.new("RGB", (30, 20), (9, 99, 199)), "WEBP", lossless=True))
    (root / "photo.bmp").write_bytes(encoded(Image.new("RGB", (30, 20), (9, 99, 199)), "BMP"))
    png = encoded(Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)), "PNG")
    (root / "truncated.png").write_bytes(png[: len(png) // 2])
    (root / "zero.png").write_bytes(b"")
    (root / "text.jpg").write_text("not a photo, just some words\n")
    return root


def error_line(call, *args, **kwargs) -> str:
    """The one line the CLI would print (message and hint, fields as flags) for the InputError `call` raises."""
    from kimivl_cli.cli.flags import error_line as cli_error_line

    with pytest.raises(InputError) as caught:
        call(*args, **kwargs)
    return cli_error_line(caught.value).removeprefix("error: ")


def _ebml(element_id: int, payload: bytes) -> bytes:
    """One Matroska element: its ID, an 8-byte size, the payload."""
    return (
        element_id.to_bytes((element_id.bit_length() + 7) // 8, "big")
        + b"\x01"
        + len(payload).to_bytes(7, "big")
        + payload
    )


def _ebml_uint(element_id: int, value: int) -> bytes:
    return _ebml(element_id, value.to_bytes(max(1, (value.bit_length() + 7) // 8), "big"))


def vfr_mkv(times_ms: list[int], size: tuple[int, int] = (32, 24)) -> bytes:
    """A variable-frame-rate Matroska file written by hand (no encoder needed): one MJPEG frame at
    each time, frame i filled with red = 30 * i so a test can tell which frame it got."""
    header = _ebml(
        0x1A45DFA3,  # EBML header: version 1, 4-byte IDs, 8-byte sizes, DocType matroska v4
        _ebml_uint(0x4286, 1)
        + _ebml_uint(0x42F7, 1)
        + _ebml_uint(0x42F2, 4)
        + _ebml_uint(0x42F3, 8)
        + _ebml(0x4282, b"matroska")
        + _ebml_uint(0x4287, 4)
        + _ebml_uint(0x4285, 2),
    )
    info = _ebml(  # Info: millisecond timecodes, muxer/writer names, duration
        0x1549A966,
        _ebml_uint(0x2AD7B1, 1_000_000)
        + _ebml(0x4D80, b"kimivl-tests")
        + _ebml(0x5741, b"kimivl-tests")
        + _ebml(0x4489, struct.pack(">d", times_ms[-1] + 40.0)),
    )
    video = _ebml(0xE0, _ebml_uint(0xB0, size[0]) + _ebml_uint(0xBA, size[1]))
    track = _ebml_uint(0xD7, 1) + _ebml_uint(0x73C5, 1) + _ebml_uint(0x83, 1) + _ebml(0x86, b"V_MJPEG") + video
    blocks = b"".join(  # SimpleBlock: track 1, int16 time relative to the cluster, keyframe flag, JPEG
        _ebml(0xA3, b"\x81" + struct.pack(">hB", t, 0x80) + encoded(Image.new("RGB", size, (30 * i, 0, 0)), "JPEG"))
        for i, t in enumerate(times_ms)
    )
    cluster = _ebml(0x1F43B675, _ebml_uint(0xE7, 0) + blocks)
    return header + _ebml(0x18538067, info + _ebml(0x1654AE6B, _ebml(0xAE, track)) + cluster)
