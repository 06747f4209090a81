"""Image files -> RGB `PIL.Image`s, the way the model's processor expects them.

- Formats: PNG, JPEG, WebP, GIF, BMP, TIFF. GIFs and animated WebPs give their first frame;
  a multipage TIFF gives every page (a scanned document is often one TIFF).
- EXIF orientation is applied, so a phone photo is upright.
- Everything becomes 8-bit RGB: palette, CMYK, grey and 16-bit grey (scaled, not clipped).
  Alpha is dropped without compositing by default, exactly as the official processor's
  `convert("RGB")` does (the processor goldens hold an RGBA image); pass `background=` to
  composite transparent pixels onto a colour instead (e.g. white for logos on transparency).
- Decompression bombs: the sizes in the headers are checked before any pixel is decoded, per page
  (`max_pixels`) and for the whole file (`max_total`: a 613 KB TIFF can hold 20 pages of
  4000x4000), so a bomb fails in milliseconds without allocating.
"""

from __future__ import annotations

import contextlib
import re
import warnings

import numpy as np
from PIL import Image, ImageOps

from kimivl_cli.errors import InputError
from kimivl_cli.media.inputs import Source, as_input
from kimivl_cli.media.sniff import MediaKind

DEFAULT_MAX_PIXELS = 100_000_000
"""Per image, page or video frame: above any camera here (a 100 MP image is ~400 MB in memory, as
Pillow keeps RGB at 4 bytes a pixel). Pillow itself also refuses more than 2 * `Image.MAX_IMAGE_PIXELS`
(~179 MP) whatever this is set to."""

MAX_INPUT_PIXELS = 200_000_000
"""Per input: the pixels of all pages of an image file, or of all frames kept from a video, together
(~800 MB as Pillow RGB, 600 MB as video frames). Checked from the headers before decoding."""

FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF")
_MULTIPAGE = {"TIFF"}  # formats whose frames are pages; the others give their first frame
_ALPHA_MODES = {"RGBA", "LA", "PA", "RGBa", "La"}


def load_images(
    source: Source,
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    max_total: int = MAX_INPUT_PIXELS,
    max_pages: int | None = None,
    background: tuple[int, int, int] | None = None,
) -> list[Image.Image]:
    """Every page of an image file (one for most formats; the first `max_pages`) as 8-bit RGB.

    Raises InputError for anything that is not a decodable image of at most `max_pixels` pixels
    per page and `max_total` for the pages together: unknown formats, truncated or empty files,
    bombs. Every page's size is read from its header before the first is decoded. Memory: one
    decoded page at a time plus the RGB results.
    """
    item = as_input(source)
    if item.kind is not MediaKind.IMAGE:
        raise InputError(f"{item.name} is {item.describe()}, not an image")
    with item.open() as fh, warnings.catch_warnings():
        # Pillow warns on corrupt EXIF, truncated reads and near-limit sizes; we raise where it matters
        # and enforce our own size limit, so its warnings would only break the one-line error output.
        warnings.simplefilter("ignore")
        try:
            image = Image.open(fh, formats=FORMATS)
            count = getattr(image, "n_frames", 1) if image.format in _MULTIPAGE else 1
            count = count if max_pages is None else min(count, max_pages)
            sizes = []
            for index in range(count):  # headers only: a TIFF seek reads the page's directory, no pixels
                image.seek(index)
                check_pixels(item.name, *image.size, max_pixels)
                sizes.append(image.size)
            check_budget(item.name, sizes, max_total, "pages")
            pages = []
            for index in range(count):
                image.seek(index)
                pages.append(_to_rgb(image, background))
            return pages
        except InputError:
            raise
        except Image.DecompressionBombError as exc:  # Pillow's own check at open, above ~179 MP
            pixels = re.search(r"\((\d+) pixels\)", str(exc))
            size = f"{int(pixels[1]) / 1e6:.3g} MP" if pixels else "the image"
            raise InputError(f"{item.name}: {size} is over the {max_pixels / 1e6:.3g} MP limit", _SIZE_HINT) from None
        except MemoryError:
            raise InputError(f"{item.name}: not enough memory to decode this image", _SIZE_HINT) from None
        except Exception as exc:  # Pillow reports corrupt data with many exception types
            raise InputError(f"{item.name}: cannot decode the image ({_reason(exc)})") from None


_SIZE_HINT = "downscale it first"


def check_pixels(name: str, width: int, height: int, max_pixels: int = DEFAULT_MAX_PIXELS) -> None:
    """InputError unless one image, page or frame of this size is within `max_pixels`."""
    if width <= 0 or height <= 0:
        raise InputError(f"{name}: the image has no pixels ({width}x{height})")
    if width * height > max_pixels:
        raise InputError(
            f"{name}: {width}x{height} is {width * height / 1e6:.3g} MP, over the {max_pixels / 1e6:.3g} MP limit",
            _SIZE_HINT,
        )


def check_budget(
    name: str, sizes: list[tuple[int, int]], max_total: int = MAX_INPUT_PIXELS, unit: str = "pages", hint: str = ""
) -> None:
    """InputError unless the pages or frames of one input, together, are within `max_total` pixels."""
    total = sum(w * h for w, h in sizes)
    if total > max_total:
        raise InputError(
            f"{name}: {len(sizes)} {unit} of {total / 1e6:.4g} MP together, over the "
            f"{max_total / 1e6:.3g} MP budget per input",
            hint or f"split the file or downscale its {unit}",
        )


def _to_rgb(image: Image.Image, background: tuple[int, int, int] | None) -> Image.Image:
    """Decode the current frame and bring it to 8-bit RGB (see the module docstring)."""
    image.load()
    with contextlib.suppress(Exception):  # a malformed EXIF block: the pixels are fine, keep them as stored
        image = ImageOps.exif_transpose(image) or image
    if image.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        image = _high_depth_to_grey8(image)
    if (image.mode == "P" and "transparency" in image.info) or image.mode in _ALPHA_MODES:
        image = image.convert("RGBA")
        if background is not None:
            canvas = Image.new("RGBA", image.size, (*background, 255))
            image = Image.alpha_composite(canvas, image)
    return image.convert("RGB")


def _high_depth_to_grey8(image: Image.Image) -> Image.Image:
    """16-bit or 32-bit grey -> 8-bit: 16-bit data is scaled by 1/257; float data in [0, 1] by 255."""
    values = np.asarray(image, dtype=np.float64)
    if image.mode == "F":
        scale = 255.0 if values.size and np.nanmax(values) <= 1.0 else 1.0
    else:
        scale = 1 / 257 if image.mode.startswith("I;16") or (values.size and values.max() > 255) else 1.0
    grey = np.clip(np.nan_to_num(values * scale), 0, 255).round().astype(np.uint8)
    return Image.fromarray(grey)  # uint8 H x W -> mode L


def _reason(exc: Exception) -> str:
    text = str(exc).split("\n")[0].strip()
    if "cannot identify image file" in text:
        return "not a readable image, or a variant Pillow does not support"
    return text or type(exc).__name__
