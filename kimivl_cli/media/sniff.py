"""What a file is, from its first bytes: never from its name.

A `.jpg` that holds text is text; a PNG named `scan.pdf` is an image. Every input goes
through `sniff` so that each command picks the right decoder and refuses the rest early.
"""

from __future__ import annotations

import codecs
from enum import Enum

SNIFF_BYTES = 4096
"""How much of a file `sniff` needs: a PDF header may sit anywhere in the first 1024 bytes,
an MPEG transport stream is recognised by three 188-byte packets, text by a valid UTF-8 prefix."""


class MediaKind(str, Enum):
    """The kinds of input kimivl tells apart. A `str` so that `kind == "pdf"` reads naturally."""

    IMAGE = "image"
    PDF = "pdf"
    VIDEO = "video"
    TEXT = "text"
    UNKNOWN = "unknown"

    def __str__(self) -> str:
        return self.value


# Prefix -> kind. Formats Pillow, PyMuPDF and OpenCV (FFmpeg) decode here.
_PREFIXES: tuple[tuple[bytes, MediaKind], ...] = (
    (b"\x89PNG\r\n\x1a\n", MediaKind.IMAGE),
    (b"\xff\xd8\xff", MediaKind.IMAGE),  # JPEG
    (b"GIF87a", MediaKind.IMAGE),
    (b"GIF89a", MediaKind.IMAGE),
    (b"II*\x00", MediaKind.IMAGE),  # TIFF, little-endian
    (b"MM\x00*", MediaKind.IMAGE),  # TIFF, big-endian
    (b"\x1a\x45\xdf\xa3", MediaKind.VIDEO),  # Matroska / WebM (EBML)
    (b"\x00\x00\x01\xba", MediaKind.VIDEO),  # MPEG program stream
    (b"FLV\x01", MediaKind.VIDEO),
)
_BMP_DIB_SIZES = {12, 40, 52, 56, 64, 108, 124}  # BITMAPCOREHEADER .. BITMAPV5HEADER
# ISO base media (MP4, MOV, 3GP): a box type at offset 4. HEIF/AVIF share the container but are
# still images Pillow cannot open here, so their brands are unknown rather than video.
_ISO_BOXES = {b"ftyp", b"moov", b"mdat", b"wide"}
_STILL_BRANDS = {b"heic", b"heix", b"heim", b"heis", b"mif1", b"msf1", b"avif", b"avis"}
_TS_PACKET = 188


def sniff(data: bytes) -> MediaKind:
    """The kind of a file from its first bytes (pass at least `SNIFF_BYTES` when there are that many).

    Only the magic numbers are checked; whether the rest decodes is the loaders' business.
    Text means a valid UTF-8 prefix without NUL bytes (a multi-byte character cut at the end
    of `data` is allowed). Empty data is UNKNOWN.
    """
    for prefix, kind in _PREFIXES:
        if data.startswith(prefix):
            return kind
    if data[:2] == b"BM" and len(data) >= 18 and int.from_bytes(data[14:18], "little") in _BMP_DIB_SIZES:
        return MediaKind.IMAGE
    if data[:4] == b"RIFF" and len(data) >= 12:
        return {b"WEBP": MediaKind.IMAGE, b"AVI ": MediaKind.VIDEO}.get(data[8:12], MediaKind.UNKNOWN)
    if data[4:8] in _ISO_BOXES:
        if data[4:8] == b"ftyp" and data[8:12] in _STILL_BRANDS:
            return MediaKind.UNKNOWN
        return MediaKind.VIDEO
    if data.startswith(b"%PDF-"):
        return MediaKind.PDF
    if _is_text(data):
        return MediaKind.TEXT
    if b"%PDF-" in data[:1024]:  # readers accept junk before the header; text mentioning it stays text
        return MediaKind.PDF
    if len(data) > 2 * _TS_PACKET and all(data[i] == 0x47 for i in (0, _TS_PACKET, 2 * _TS_PACKET)):
        return MediaKind.VIDEO  # MPEG transport stream: a sync byte every 188 bytes
    return MediaKind.UNKNOWN


def _is_text(data: bytes) -> bool:
    if not data or b"\x00" in data:
        return False
    try:
        codecs.getincrementaldecoder("utf-8")().decode(data, final=False)
    except UnicodeDecodeError:
        return False
    return True
