"""The sniffer names real files by content, whatever they are called."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from kimivl_cli.media import SNIFF_BYTES, MediaKind, sniff
from tests.media.conftest import skimage_file


def head(path: Path) -> bytes:
    return path.read_bytes()[:SNIFF_BYTES]


@pytest.mark.parametrize(
    "name", ["astronaut.png", "rocket.jpg", "no_time_for_that_tiny.gif", "multipage.tif", "page.png"]
)
def test_real_images(name: str) -> None:
    assert sniff(head(skimage_file(name))) is MediaKind.IMAGE


def test_real_pdf_and_video(libtasn1_pdf: Path, bikes_mp4: Path) -> None:
    assert sniff(head(libtasn1_pdf)) is MediaKind.PDF
    assert sniff(head(bikes_mp4)) is MediaKind.VIDEO


@pytest.mark.parametrize(
    ("name", "kind"),
    [
        ("rotated.jpg", MediaKind.IMAGE),
        ("photo.webp", MediaKind.IMAGE),
        ("photo.bmp", MediaKind.IMAGE),
        ("pages.tif", MediaKind.IMAGE),
        ("palette.gif", MediaKind.IMAGE),
        ("text.jpg", MediaKind.TEXT),  # the name lies; the bytes do not
    ],
)
def test_generated_files(media_dir: Path, name: str, kind: MediaKind) -> None:
    assert sniff(head(media_dir / name)) is kind


@pytest.mark.parametrize(
    ("data", "kind"),
    [
        (b"", MediaKind.UNKNOWN),
        (b"\x00\x00\x00\x18ftypisom\x00\x00\x02\x00", MediaKind.VIDEO),
        (b"\x00\x00\x00\x18ftypqt  \x00\x00\x02\x00", MediaKind.VIDEO),  # QuickTime .mov
        (b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00", MediaKind.UNKNOWN),  # HEIF still image: not decodable here
        (b"\x1a\x45\xdf\xa3\x93\x42\x82\x88matroska", MediaKind.VIDEO),
        (b"RIFF\x00\x00\x00\x00AVI LIST", MediaKind.VIDEO),
        (b"RIFF\x00\x00\x00\x00WAVEfmt ", MediaKind.UNKNOWN),  # audio
        (b"G" + b"\x00" * 187 + b"G" + b"\x01" * 187 + b"G" + b"\x02" * 10, MediaKind.VIDEO),  # MPEG-TS packets
        (b"\xef\xbb\xbfh\xc3\xa9llo", MediaKind.TEXT),  # UTF-8 with BOM
        ("caf\u00e9".encode()[:-1], MediaKind.TEXT),  # a character cut by the head is still text
        (b"\xff\xfeh\x00i\x00", MediaKind.UNKNOWN),  # UTF-16 has NULs
        (b"BMW is a car maker\n", MediaKind.TEXT),  # 'BM' alone is not a bitmap
        (b"see %PDF-1.7 in the spec\n", MediaKind.TEXT),  # text that mentions PDF stays text
        (b"\x00\x01junk%PDF-1.4\n", MediaKind.PDF),  # junk before the header, as readers allow
    ],
)
def test_magic_numbers(data: bytes, kind: MediaKind) -> None:
    assert sniff(data) is kind


def test_kind_is_a_string() -> None:
    assert MediaKind.PDF == "pdf" and str(MediaKind.VIDEO) == "video"


@given(st.binary(max_size=600))
def test_any_bytes_have_a_kind(data: bytes) -> None:
    assert isinstance(sniff(data), MediaKind)
