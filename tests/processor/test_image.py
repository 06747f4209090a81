"""Image processor against the reference goldens, plus invariants over random sizes."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image
from safetensors.torch import load_file

from kimivl_cli.errors import CheckpointError, InputError
from kimivl_cli.processor.image import (
    CLIP_MEAN,
    ImageProcessorConfig,
    image_grid_hw,
    image_token_count,
    limited_size,
    process_images,
    resize_to_token_budget,
    size_for_token_budget,
)


@pytest.fixture(scope="module")
def golden(golden_dir):
    root = golden_dir / "processor"
    meta = json.loads((root / "golden.json").read_text())
    cfg = ImageProcessorConfig.from_file(root / "preprocessor_config.json")
    images = {m["name"]: Image.open(root / m["file"]) for m in meta["images"]}
    return meta, cfg, images, load_file(root / "golden.safetensors")


def _sha(t: torch.Tensor) -> str:
    return hashlib.sha256(t.numpy().astype("<f4").tobytes()).hexdigest()


def test_golden_config_parsed(golden):
    _, cfg, _, _ = golden
    assert cfg == ImageProcessorConfig(4096, 14, (2, 2), True, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    assert cfg == ImageProcessorConfig.official()


def test_each_golden_image(golden):
    meta, cfg, images, tensors = golden
    for m in meta["images"]:
        name = m["name"]
        image = images[name]
        assert list(image.size) == m["input_size_wh"] and image.mode == m["input_mode"]
        out = process_images([image], cfg)
        assert out.grid_hws.tolist() == tensors[f"image_grid_hws.{name}"].tolist() == [m["image_grid_hw"]]
        assert out.tokens_per_image == [m["n_image_tokens"]]
        assert out.pixel_values.shape == (m["n_patches"], 3, 14, 14) and out.pixel_values.dtype == torch.float32
        if f"pixel_values.{name}" in tensors:
            ref, got = tensors[f"pixel_values.{name}"], out.pixel_values
        else:
            ref = tensors[f"pixel_values_sample.{name}"]
            got = out.pixel_values[tensors[f"sample_patch_index.{name}"]]
        assert (got - ref).abs().max().item() <= 1e-5, name
        assert _sha(out.pixel_values) == m["pixel_values_sha256_f32le"], name
        assert out.pixel_values.double().sum().item() == pytest.approx(m["pixel_values_sum"], rel=1e-9)
        assert image_token_count(*m["input_size_wh"], cfg) == m["n_image_tokens"]
        assert image_token_count(*m["input_size_wh"]) == m["n_image_tokens"]  # default = official config


def test_golden_thinking_2506_token_limit(golden):
    meta, cfg, _, _ = golden
    big = ImageProcessorConfig(**{**cfg.__dict__, "in_token_limit": 16384})
    for m in meta["images"]:
        assert list(image_grid_hw(*m["input_size_wh"], big)) == m["in_token_limit_16384"]["image_grid_hw"]


def test_golden_batch_of_six(golden):
    meta, cfg, images, tensors = golden
    names = [m["name"] for m in meta["images"]]
    batch = process_images([images[n] for n in names], cfg)
    assert batch.grid_hws.tolist() == tensors["image_grid_hws.batch_all6"].tolist()
    singles = [process_images([images[n]], cfg).pixel_values for n in names]
    assert torch.equal(batch.pixel_values, torch.cat(singles))
    assert batch.tokens_per_image == [m["n_image_tokens"] for m in meta["images"]]


def test_processed_png_is_the_padded_image(golden):
    """The reference's padded image, normalised and patchified, equals our pixels exactly."""
    meta, cfg, images, _ = golden
    root = next(iter(images.values())).filename.rsplit("/images/", 1)[0]
    m = next(m for m in meta["images"] if m["name"] == "gray_500x375")
    padded = np.asarray(Image.open(f"{root}/{m['processed_file']}").convert("RGB"), dtype=np.float32)
    ours = process_images([images[m["name"]]], cfg).pixel_values
    h, w = m["image_grid_hw"]
    unpatched = ours.view(h, w, 3, 14, 14).permute(2, 0, 3, 1, 4).reshape(3, h * 14, w * 14)
    assert torch.equal(unpatched, (torch.from_numpy(padded).permute(2, 0, 1) / 255 - 0.5) / 0.5)


def test_refuses_grid_beyond_rope_table():
    with pytest.raises(InputError, match="patches per side"):
        image_token_count(14 * 600, 20)
    with pytest.raises(InputError):
        process_images([Image.new("RGB", (7200, 30))])
    assert image_grid_hw(14 * 510, 20)[1] == 510  # largest even side that fits


def test_class_defaults_when_fields_absent(tmp_path):
    path = tmp_path / "preprocessor_config.json"
    path.write_text('{"image_processor_type": "KimiVLImageProcessor"}')
    cfg = ImageProcessorConfig.from_file(path)
    assert cfg.pad_input is False and cfg.in_token_limit == 4096 and cfg.image_mean == CLIP_MEAN
    path.write_text('{"patch_size": "14"}')
    with pytest.raises(CheckpointError, match="patch_size"):
        ImageProcessorConfig.from_file(path)
    with pytest.raises(CheckpointError, match="no preprocessor_config"):
        ImageProcessorConfig.from_file(tmp_path / "missing.json")


def test_centre_crop_when_not_padding():
    cfg = ImageProcessorConfig(pad_input=False, image_mean=(0, 0, 0), image_std=(1, 1, 1))
    data = np.arange(70 * 100 * 3, dtype=np.uint8).reshape(70, 100, 3)
    out = process_images([Image.fromarray(data)], cfg)
    assert out.grid_hws.tolist() == [[4, 6]]  # 56 x 84: the 28-multiples inside 70 x 100
    h, w = 4, 6
    pixels = out.pixel_values.view(h, w, 3, 14, 14).permute(0, 3, 1, 4, 2).reshape(56, 84, 3)
    expected = torch.from_numpy(data[7:63, 8:92].astype(np.float32) / 255)
    assert torch.equal(pixels, expected)
    assert process_images([Image.new("RGB", (10, 40))], cfg).grid_hws.tolist() == [[2, 2]]


sizes = st.tuples(st.integers(1, 4000), st.integers(1, 4000))


@settings(max_examples=300, deadline=None)
@given(sizes, st.sampled_from([1024, 4096, 16384]))
def test_grid_invariants(size, limit):
    cfg = ImageProcessorConfig(in_token_limit=limit, pad_input=True)
    w, h = size
    try:
        gh, gw = image_grid_hw(w, h, cfg)
    except InputError:
        assert max(w, h) >= 14 * 510  # only extreme aspect ratios overflow the RoPE table
        return
    assert gh % 2 == 0 and gw % 2 == 0
    assert image_token_count(w, h, cfg) == gh * gw // 4
    # padding adds less than one 28-pixel unit per side to the downscaled image ...
    lw, lh = limited_size(w, h, cfg)
    assert lw <= w and lh <= h
    assert (gh - 2) * 14 < lh <= gh * 14 and (gw - 2) * 14 < lw <= gw * 14
    # ... whose area stays within the limit up to the floor() in the patch count
    if (w // 14) * (h // 14) > limit:
        assert lw * lh / 196 <= limit * (w * h) / (196 * (w // 14) * (h // 14))
    if min(w, h) >= 280:
        assert lw * lh / 196 <= limit * 1.05**2


@settings(max_examples=25, deadline=None)
@given(st.tuples(st.integers(1, 300), st.integers(1, 300)), st.sampled_from(["RGB", "RGBA", "L"]), st.integers(0, 255))
def test_pixels_invariants(size, mode, value):
    cfg = ImageProcessorConfig(in_token_limit=64, pad_input=True, image_mean=(0.1, 0.2, 0.3), image_std=(0.5, 0.6, 0.7))
    out = process_images([Image.new(mode, size, value)], cfg)
    (gh, gw) = out.grid_hws[0].tolist()
    assert out.pixel_values.shape == (gh * gw, 3, 14, 14)
    assert out.tokens_per_image == [gh * gw // 4]
    # the bottom-right patch is padding whenever the image was padded there
    w, h = size
    if w % 28 and h % 28 and w * h <= 64 * 196:
        pad = out.pixel_values[-1, :, -1, -1]
        assert torch.allclose(pad, (0 - torch.tensor([0.1, 0.2, 0.3])) / torch.tensor([0.5, 0.6, 0.7]))


@settings(max_examples=200, deadline=None)
@given(sizes, st.integers(1, 2000))
def test_token_budget(size, budget):
    w, h = size
    nw, nh = size_for_token_budget(w, h, budget)
    assert nw <= w and nh <= h
    assert image_token_count(nw, nh) <= budget or (nw, nh) == (1, 1)
    if (nw, nh) != (w, h):
        assert abs(nw / w - nh / h) < 0.05 + 2 / min(w, h)  # aspect kept up to rounding


def test_resize_to_token_budget_image():
    image = Image.new("RGB", (1000, 700), "white")
    small = resize_to_token_budget(image, 100)
    assert image_token_count(*small.size) <= 100 < image_token_count(*image.size)
    assert image_token_count(*small.size) >= 80  # not needlessly small
    assert resize_to_token_budget(image, 10_000) is image
    nw, nh = size_for_token_budget(9000, 30, 10_000)  # too wide for the RoPE table: shrunk until it fits
    assert nw // 14 < 510 and image_token_count(nw, nh) <= 10_000
