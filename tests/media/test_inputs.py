"""Command-line arguments -> inputs: stdin, folders in natural order, clear errors naming the file."""

from __future__ import annotations

import io
import os
import shutil
from pathlib import Path

import pytest

from kimivl_cli.errors import InputError
from kimivl_cli.media import MediaInput, MediaKind, as_input, resolve_inputs


@pytest.fixture
def folder(tmp_path: Path, media_dir: Path, libtasn1_pdf: Path) -> Path:
    """scans/page10.png, scans/page2.png, scans/sub/page1.png, a PDF, plus files to skip."""
    scans = tmp_path / "scans"
    (scans / "sub").mkdir(parents=True)
    (scans / ".hidden").mkdir()
    for name in ("page10.png", "page2.png", "sub/page1.png", ".hidden/x.png", ".dot.png"):
        shutil.copy(media_dir / "one.png", scans / name)
    shutil.copy(libtasn1_pdf, scans / "Manual.pdf")
    shutil.copy(media_dir / "text.jpg", scans / "notes.jpg")  # text: skipped inside a folder
    (scans / "empty.png").write_bytes(b"")
    return scans


def test_folder_expands_recursively_in_natural_order(folder: Path) -> None:
    found = resolve_inputs([str(folder)])
    assert [Path(i.name).relative_to(folder).as_posix() for i in found] == [
        "Manual.pdf",
        "page2.png",
        "page10.png",
        "sub/page1.png",
    ]
    assert [i.kind for i in found] == [MediaKind.PDF, MediaKind.IMAGE, MediaKind.IMAGE, MediaKind.IMAGE]
    assert resolve_inputs([str(folder)]) == found  # stable


def test_arguments_keep_their_order(media_dir: Path, libtasn1_pdf: Path) -> None:
    found = resolve_inputs([str(libtasn1_pdf), str(media_dir / "one.png")])
    assert [i.kind for i in found] == ["pdf", "image"]
    assert found[0].path == libtasn1_pdf and found[0].data is None
    assert found[0].size == libtasn1_pdf.stat().st_size


def test_stdin_is_read_once(media_dir: Path) -> None:
    data = (media_dir / "one.png").read_bytes()
    (item,) = resolve_inputs(["-"], stdin=io.BytesIO(data))
    assert item == MediaInput("<stdin>", MediaKind.IMAGE, data=data)
    assert item.read_bytes() == data and item.open().read() == data
    with pytest.raises(InputError, match="twice"):
        resolve_inputs(["-", "-"], stdin=io.BytesIO(data))
    with pytest.raises(InputError, match="stdin is empty"):
        resolve_inputs(["-"], stdin=io.BytesIO(b""))


def test_text_accepted_only_when_asked(media_dir: Path) -> None:
    path = str(media_dir / "text.jpg")
    with pytest.raises(InputError, match=r"text\.jpg is text, not an image, a PDF or a video"):
        resolve_inputs([path])
    (item,) = resolve_inputs([path], kinds={MediaKind.TEXT, MediaKind.IMAGE})
    assert item.kind is MediaKind.TEXT


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda d: d / "missing.png", "missing.png: no such file or folder"),
        (lambda d: d / "zero.png", r"zero\.png is empty \(0 bytes\)"),
        (lambda d: d, "no supported files in this folder"),
    ],
)
def test_errors_name_the_file(tmp_path: Path, media_dir: Path, make, message: str) -> None:
    (tmp_path / "zero.png").write_bytes(b"")
    (tmp_path / "x.bin").write_bytes(b"\x00\x01\x02\x03")
    with pytest.raises(InputError, match=message):
        resolve_inputs([str(make(tmp_path))])


def test_unknown_type(tmp_path: Path) -> None:
    (tmp_path / "x.png").write_bytes(b"\x00\x01\x02\x03" * 10)
    with pytest.raises(InputError, match=r"x\.png: not a file type kimivl reads"):
        resolve_inputs([str(tmp_path / "x.png")])


def test_unreadable_file(tmp_path: Path) -> None:
    path = tmp_path / "secret.png"
    path.write_bytes(b"\x89PNG\r\n\x1a\n")
    path.chmod(0)
    if os.access(path, os.R_OK):
        pytest.skip("running as root: every file is readable")
    with pytest.raises(InputError, match=r"secret\.png: cannot read"):
        resolve_inputs([str(path)])


def test_as_input(media_dir: Path) -> None:
    assert as_input(media_dir / "one.png").kind is MediaKind.IMAGE
    assert as_input(b"%PDF-1.4 ...").kind is MediaKind.PDF
    with pytest.raises(ValueError):
        MediaInput("x", MediaKind.IMAGE)
