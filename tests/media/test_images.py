"""Images in, 8-bit RGB pages out, the way the processor expects them; every failure an InputError."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from kimivl_cli.errors import InputError
from kimivl_cli.media import load_images
from tests.conftest import shared_path
from tests.media.conftest import skimage_file


def only_page(source, **options) -> Image.Image:
    (page,) = load_images(source, **options)
    assert page.mode == "RGB"
    return page


@pytest.mark.parametrize(
    ("name", "size"),
    [("astronaut.png", (512, 512)), ("rocket.jpg", (640, 427)), ("page.png", (384, 191)), ("logo.png", (500, 500))],
)
def test_real_photos_and_scans(name: str, size: tuple[int, int]) -> None:
    path = skimage_file(name)
    page = only_page(path)
    assert page.size == size
    assert np.array_equal(np.asarray(page), np.asarray(Image.open(path).convert("RGB")))


def test_grey_scan_is_replicated() -> None:
    page = np.asarray(only_page(skimage_file("page.png")))
    assert np.array_equal(page[..., 0], page[..., 2]) and page.std() > 10


def test_alpha_dropped_like_the_official_processor(golden_dir: Path) -> None:
    """The processor golden for the RGBA image: no resize, so its top-left 333x777 is our load."""
    source = shared_path("golden", "processor", "images", "rgba_333x777.png")
    assert Image.open(source).mode == "RGBA"
    processed = np.asarray(Image.open(shared_path("golden", "processor", "processed", "rgba_333x777.png")))
    assert np.array_equal(np.asarray(only_page(source)), processed[:777, :333, :3])


def test_alpha_composited_on_a_background(media_dir: Path) -> None:
    dropped = only_page(media_dir / "rgba.png")
    white = only_page(media_dir / "rgba.png", background=(255, 255, 255))
    assert dropped.getpixel((0, 0)) == (200, 100, 50)  # the hidden colour shows: alpha ignored
    assert white.getpixel((0, 0)) == (255, 255, 255)
    assert white.getpixel((1, 1)) == dropped.getpixel((1, 1)) == (10, 200, 30)


def test_palette_with_transparency(media_dir: Path) -> None:
    assert only_page(media_dir / "palette.gif").getpixel((0, 0)) == (255, 255, 0)
    assert only_page(media_dir / "palette.gif", background=(9, 9, 9)).getpixel((0, 0)) == (255, 255, 0)


def test_exif_orientation_applied(media_dir: Path) -> None:
    page = only_page(media_dir / "rotated.jpg")
    assert page.size == (20, 40)  # stored 40x20, orientation 6 = rotate 90 clockwise
    top, bottom = page.getpixel((10, 2)), page.getpixel((10, 37))
    assert top[0] > 200 and top[2] < 60  # the stored left (red) band is now at the top
    assert bottom[2] > 200 and bottom[0] < 60


def test_cmyk_to_rgb(media_dir: Path) -> None:
    red = only_page(media_dir / "cmyk.jpg").getpixel((8, 8))
    assert red[0] > 230 and red[1] < 25 and red[2] < 25


def test_16_bit_grey_is_scaled_not_clipped(media_dir: Path) -> None:
    page = only_page(media_dir / "grey16.png")
    assert [page.getpixel((x, 0)) for x in range(3)] == [(0, 0, 0), (128, 128, 128), (255, 255, 255)]


def test_one_pixel(media_dir: Path) -> None:
    assert only_page(media_dir / "one.png").getpixel((0, 0)) == (1, 2, 3)


@pytest.mark.parametrize("name", ["photo.webp", "photo.bmp"])
def test_webp_and_bmp(media_dir: Path, name: str) -> None:
    assert only_page(media_dir / name).getpixel((3, 3)) == (9, 99, 199)


def test_multipage_tiff_gives_every_page(media_dir: Path) -> None:
    pages = load_images(media_dir / "pages.tif")
    assert [p.getpixel((0, 0)) for p in pages] == [(255, 0, 0), (0, 255, 0), (0, 0, 255)]
    assert len(load_images(skimage_file("multipage.tif"))) == 2


def test_gif_gives_its_first_frame() -> None:
    path = skimage_file("no_time_for_that_tiny.gif")
    assert Image.open(path).n_frames > 1
    assert np.array_equal(np.asarray(only_page(path)), np.asarray(Image.open(path).convert("RGB")))


def test_bomb_header_fails_before_decoding(media_dir: Path) -> None:
    # The file holds only a header: decoding it would say "truncated", so this message proves the
    # size was checked first; and 400 MP would take seconds and 1.2 GB to allocate.
    start = time.perf_counter()
    with pytest.raises(InputError, match=r"bomb\.png: .*400 MP.* over the 100 MP limit"):
        load_images(media_dir / "bomb.png")
    assert time.perf_counter() - start < 0.5
    with pytest.raises(InputError, match=r"100x100 is 0.01 MP, over the 0.01 MP limit"):
        load_images(media_dir / "square.png", max_pixels=9999)


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("truncated.png", r"truncated\.png: cannot decode the image"),
        ("zero.png", r"zero\.png is empty"),
        ("text.jpg", r"text\.jpg is text, not an image"),
    ],
)
def test_broken_files(media_dir: Path, name: str, message: str) -> None:
    with pytest.raises(InputError, match=message):
        load_images(media_dir / name)


def test_pillow_cannot_read_this_tiff() -> None:
    """A real planar RGB TIFF Pillow does not support: a clean error, not Pillow's exception."""
    with pytest.raises(InputError, match=r"multipage_rgb\.tif: cannot decode the image"):
        load_images(skimage_file("multipage_rgb.tif"))


def test_bytes_source(media_dir: Path) -> None:
    assert only_page((media_dir / "one.png").read_bytes()).size == (1, 1)
