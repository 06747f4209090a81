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
    """The one line the CLI would print (message and hint) for the InputError `call` raises."""
    with pytest.raises(InputError) as caught:
        call(*args, **kwargs)
    return caught.value.one_line()
