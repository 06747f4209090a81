"""Kimi-VL image processor: PIL image -> normalised 14x14 patches + patch grid.

Reproduces the reference `KimiVLImageProcessor` bit for bit (PIL, numpy and torch only):

1. token-limit downscale: if (W//14)*(H//14) > in_token_limit, resize with PIL BICUBIC to
   (int(W*s), int(H*s)), s = sqrt(limit / patches) (never upscales);
2. pad right/bottom with black to multiples of 28 (merge kernel x patch) — or, with `pad_input`
   false, centre-crop to multiples of 28;
3. refuse grids whose side reaches the 512-entry 2D RoPE table;
4. `convert("RGB")` (alpha dropped without compositing, grey replicated), /255, (x-mean)/std;
5. patchify row-major over the (h, w) grid: [h*w, 3, 14, 14].

Each image costs h*w/4 `<|media_pad|>` tokens after the 2x2 patch merge.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from kimivl_cli.errors import CheckpointError, InputError
from kimivl_cli.guards import read_config

MAX_GRID_SIDE = 512  # MoonViT's 2D RoPE table is 512 x 512 patches
MAX_IN_TOKEN_LIMIT = (MAX_GRID_SIDE // 2) ** 2  # tokens of the largest grid the tower takes, with 2x2 merging
MAX_PATCH_SIZE = 256  # far above any ViT's (14 here); the model's own is checked against the weights

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass(frozen=True)
class ImageProcessorConfig:
    """Fields of `preprocessor_config.json`; defaults are the reference class defaults."""

    in_token_limit: int = 4096
    patch_size: int = 14
    merge_kernel_size: tuple[int, int] = (2, 2)
    pad_input: bool = False
    image_mean: tuple[float, float, float] = CLIP_MEAN
    image_std: tuple[float, float, float] = CLIP_STD

    @property
    def unit_hw(self) -> tuple[int, int]:
        """Pixel granularity of the padded image: one merged token is unit_h x unit_w pixels."""
        return self.merge_kernel_size[0] * self.patch_size, self.merge_kernel_size[1] * self.patch_size

    @classmethod
    def official(cls) -> ImageProcessorConfig:
        """Kimi-VL-A3B-Instruct's shipped `preprocessor_config.json` (mean/std 0.5 is a best guess)."""
        return cls(pad_input=True, image_mean=(0.5, 0.5, 0.5), image_std=(0.5, 0.5, 0.5))

    @classmethod
    def from_dict(cls, d: dict) -> ImageProcessorConfig:
        def number_list(name: str, n: int, default: tuple) -> tuple:
            value = d.get(name, default)
            if not (isinstance(value, list | tuple) and len(value) == n) or not all(
                isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v) for v in value
            ):
                raise CheckpointError(f"preprocessor_config.json: {name} should be {n} finite numbers, got {value!r}")
            return tuple(value)

        def positive_int(name: str, default: int, most: int) -> int:
            value = d.get(name, default)
            if not isinstance(value, int) or isinstance(value, bool) or not 0 < value <= most:
                raise CheckpointError(
                    f"preprocessor_config.json: {name} should be an integer from 1 to {most}, got {value!r}"
                )
            return value

        pad_input = d.get("pad_input", cls.pad_input)
        if not isinstance(pad_input, bool):
            raise CheckpointError(f"preprocessor_config.json: pad_input should be true or false, got {pad_input!r}")
        merge = number_list("merge_kernel_size", 2, cls.merge_kernel_size)
        std = number_list("image_std", 3, cls.image_std)
        if not all(isinstance(m, int) and m > 0 for m in merge) or not all(s > 0 for s in std):
            raise CheckpointError("preprocessor_config.json: merge_kernel_size and image_std must be positive")
        return cls(
            in_token_limit=positive_int("in_token_limit", cls.in_token_limit, MAX_IN_TOKEN_LIMIT),
            patch_size=positive_int("patch_size", cls.patch_size, MAX_PATCH_SIZE),
            merge_kernel_size=merge,
            pad_input=pad_input,
            image_mean=number_list("image_mean", 3, cls.image_mean),
            image_std=std,
        )

    @classmethod
    def from_file(cls, path: str | Path) -> ImageProcessorConfig:
        return cls.from_dict(read_config(Path(path), "preprocessor_config.json"))


@dataclass(frozen=True)
class ProcessedImages:
    """Model inputs for a batch of images, concatenated in order.

    pixel_values: [N, 3, P, P] float32, N = sum of h*w over images
    grid_hws:     [I, 2] int64, (h, w) in patches per image
    tokens_per_image: h*w/4 per image = `<|media_pad|>` copies in the prompt
    """

    pixel_values: torch.Tensor
    grid_hws: torch.Tensor
    tokens_per_image: list[int]


def limited_size(width: int, height: int, cfg: ImageProcessorConfig) -> tuple[int, int]:
    """Size after the token-limit downscale (the reference's arithmetic, float64 then truncation)."""
    p = cfg.patch_size
    patches = (width // p) * (height // p)
    if patches <= cfg.in_token_limit:
        return width, height
    s = math.sqrt(cfg.in_token_limit / patches)
    return max(1, int(width * s)), max(1, int(height * s))


def _fitted_side(size: int, unit: int, pad: bool) -> int:
    """Side after padding up (pad) or cropping down (never below one unit) to a multiple of `unit`."""
    if pad or size < unit:
        return size + (unit - size % unit) % unit
    return size - size % unit


def image_grid_hw(width: int, height: int, cfg: ImageProcessorConfig | None = None) -> tuple[int, int]:
    """Patch grid (h, w) of a width x height image, without touching pixels. Raises InputError when too large."""
    cfg = cfg or ImageProcessorConfig.official()
    if width <= 0 or height <= 0:
        raise InputError(f"image size {width}x{height} is empty")
    w, h = limited_size(width, height, cfg)
    unit_h, unit_w = cfg.unit_hw
    grid_h = _fitted_side(h, unit_h, cfg.pad_input) // cfg.patch_size
    grid_w = _fitted_side(w, unit_w, cfg.pad_input) // cfg.patch_size
    if grid_h >= MAX_GRID_SIDE or grid_w >= MAX_GRID_SIDE:
        raise InputError(
            f"image {width}x{height} needs a {grid_h}x{grid_w} patch grid; the vision tower allows "
            f"at most {MAX_GRID_SIDE - 1} patches per side",
            f"crop or split the image so each side is under {(MAX_GRID_SIDE - 1) * cfg.patch_size} pixels",
        )
    return grid_h, grid_w


def image_token_count(width: int, height: int, cfg: ImageProcessorConfig | None = None) -> int:
    """`<|media_pad|>` tokens an image of this size costs (default: the official processor config)."""
    cfg = cfg or ImageProcessorConfig.official()
    grid_h, grid_w = image_grid_hw(width, height, cfg)
    return (grid_h // cfg.merge_kernel_size[0]) * (grid_w // cfg.merge_kernel_size[1])


def size_for_token_budget(
    width: int, height: int, max_tokens: int, cfg: ImageProcessorConfig | None = None
) -> tuple[int, int]:
    """Largest aspect-preserving size (never upscaled) whose image costs at most `max_tokens` tokens.

    Also shrinks images too wide for the RoPE table until they fit. Starts from the analytic
    scale sqrt(budget / tokens) and shrinks by 2% while padding still overshoots: a few O(1) steps.
    """
    cfg = cfg or ImageProcessorConfig.official()
    if max_tokens < 1:
        raise InputError(f"image token budget must be at least 1, got {max_tokens}")

    def fits(w: int, h: int) -> bool:
        try:
            return image_token_count(w, h, cfg) <= max_tokens
        except InputError:  # beyond the position table: shrink further
            return False

    if fits(width, height):
        return width, height
    unit_h, unit_w = cfg.unit_hw
    s = min(1.0, math.sqrt(max_tokens * unit_h * unit_w / (width * height)))
    while True:
        size = max(1, int(width * s)), max(1, int(height * s))
        if size == (1, 1) or fits(*size):
            return size
        s *= 0.98


def resize_to_token_budget(image: Image.Image, max_tokens: int, cfg: ImageProcessorConfig | None = None) -> Image.Image:
    """The image downscaled (BICUBIC) so it costs at most `max_tokens` tokens; unchanged if it already fits."""
    size = size_for_token_budget(image.width, image.height, max_tokens, cfg)
    return image if size == image.size else image.resize(size, Image.Resampling.BICUBIC)


def _fit(image: Image.Image, cfg: ImageProcessorConfig) -> np.ndarray:
    """Token-limit resize, then pad/crop; returns uint8 [H, W, 3]."""
    if image.mode not in ("RGB", "RGBA", "L", "LA"):
        image = image.convert("RGBA" if "transparency" in image.info or image.mode == "PA" else "RGB")
    size = limited_size(image.width, image.height, cfg)
    if size != image.size:
        image = image.resize(size, Image.Resampling.BICUBIC)  # in the original mode, like the reference
    rgb = np.array(image.convert("RGB"), dtype=np.uint8)
    h, w = rgb.shape[:2]
    unit_h, unit_w = cfg.unit_hw
    out_h, out_w = _fitted_side(h, unit_h, cfg.pad_input), _fitted_side(w, unit_w, cfg.pad_input)
    top = round((h - out_h) / 2) if out_h < h else 0  # centre crop (pad_input false), torchvision's rounding
    left = round((w - out_w) / 2) if out_w < w else 0
    rgb = rgb[top : top + out_h, left : left + out_w]
    if rgb.shape[:2] == (out_h, out_w):
        return rgb
    canvas = np.zeros((out_h, out_w, 3), dtype=np.uint8)  # black padding right/bottom
    canvas[: rgb.shape[0], : rgb.shape[1]] = rgb
    return canvas


def process_image(image: Image.Image, cfg: ImageProcessorConfig) -> tuple[torch.Tensor, tuple[int, int]]:
    """One image -> ([h*w, 3, P, P] float32 patches, (h, w)). Memory: a few copies of the padded image."""
    grid = image_grid_hw(image.width, image.height, cfg)
    pixels = torch.from_numpy(_fit(image, cfg)).permute(2, 0, 1).to(torch.float32).div(255)
    mean = torch.tensor(cfg.image_mean, dtype=torch.float32)[:, None, None]
    std = torch.tensor(cfg.image_std, dtype=torch.float32)[:, None, None]
    pixels = pixels.sub_(mean).div_(std)
    p, (gh, gw) = cfg.patch_size, grid
    # [3, H, W] -> [3, h, P, w, P] -> [h, w, 3, P, P] -> [h*w, 3, P, P]
    patches = pixels.view(3, gh, p, gw, p).permute(1, 3, 0, 2, 4).reshape(gh * gw, 3, p, p)
    return patches, grid


def process_images(images: Sequence[Image.Image], cfg: ImageProcessorConfig | None = None) -> ProcessedImages:
    """A batch of PIL images -> concatenated patches, grids and per-image token counts."""
    cfg = cfg or ImageProcessorConfig.official()
    results = [process_image(image, cfg) for image in images]
    mh, mw = cfg.merge_kernel_size
    p = cfg.patch_size
    return ProcessedImages(
        pixel_values=torch.cat([r[0] for r in results]) if results else torch.zeros(0, 3, p, p),
        grid_hws=torch.tensor([r[1] for r in results], dtype=torch.int64).reshape(-1, 2),
        tokens_per_image=[(h // mh) * (w // mw) for _, (h, w) in results],
    )
