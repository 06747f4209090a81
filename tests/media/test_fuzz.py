"""Random and damaged bytes through the sniffer and every loader: an InputError or a result, nothing else."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kimivl_cli.errors import InputError
from kimivl_cli.media import MediaKind, PdfDocument, VideoFile, load_images, sniff

MAGICS = [
    b"\x89PNG\r\n\x1a\n",
    b"\xff\xd8\xff\xe0",
    b"GIF89a",
    b"II*\x00",
    b"MM\x00*",
    b"BM\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x28\x00\x00\x00",
    b"RIFF\x00\x00\x00\x00WEBPVP8 ",
    b"RIFF\x00\x00\x00\x00AVI LIST",
    b"\x00\x00\x00\x18ftypisom",
    b"\x1a\x45\xdf\xa3",
    b"%PDF-1.7\n",
]


def open_everything(data: bytes) -> None:
    """Every loader on the same bytes: the right one decodes or refuses, the others refuse."""
    assert isinstance(sniff(data), MediaKind)
    for load in (load_images, PdfDocument, VideoFile):
        try:
            result = load(data)
        except InputError:
            continue
        if isinstance(result, (PdfDocument, VideoFile)):
            with result:
                result.render(0, dpi=10) if isinstance(result, PdfDocument) else result.sample(count=2)


FUZZ = settings(
    max_examples=int(os.environ.get("KIMIVL_FUZZ_EXAMPLES", 60)),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)


@FUZZ
@given(st.binary(max_size=2048))
def test_random_bytes(data: bytes) -> None:
    open_everything(data)


@FUZZ
@given(st.sampled_from(MAGICS), st.binary(max_size=2048))
def test_random_bytes_behind_real_magic(magic: bytes, tail: bytes) -> None:
    open_everything(magic + tail)


@pytest.fixture(scope="module")
def real_files(media_dir: Path, libtasn1_pdf: Path, bikes_mp4: Path) -> list[bytes]:
    small = [media_dir / n for n in ("rotated.jpg", "rgba.png", "pages.tif", "palette.gif", "photo.webp", "photo.bmp")]
    return [p.read_bytes() for p in small] + [libtasn1_pdf.read_bytes()[:20000], bikes_mp4.read_bytes()[:4096]]


@FUZZ
@given(data=st.data())
def test_damaged_real_files(real_files: list[bytes], data: st.DataObject) -> None:
    """Real files cut and with bytes overwritten: reaches deep into each decoder."""
    original = bytearray(data.draw(st.sampled_from(real_files)))
    for _ in range(data.draw(st.integers(0, 8))):
        original[data.draw(st.integers(0, len(original) - 1))] = data.draw(st.integers(0, 255))
    open_everything(bytes(original[: data.draw(st.integers(1, len(original)))]))
