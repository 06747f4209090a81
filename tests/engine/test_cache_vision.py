"""Image features: chunked encoding equals one call, and a repeated image skips the encoder."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file

from kimivl_cli.engine.engine import Engine
from kimivl_cli.engine.sampling import SamplingParams
from kimivl_cli.engine.vision_cache import FeatureCache, encode_images, image_key


class CountingEncoder:
    """Wraps `model.encode_images`, recording the patch count of each call."""

    def __init__(self, model) -> None:
        self.model, self.calls = model, []
        self.inner = model.encode_images

    def __call__(self, pixel_values: torch.Tensor, grid_hws: torch.Tensor) -> torch.Tensor:
        self.calls.append(pixel_values.shape[0])
        return self.inner(pixel_values, grid_hws)


def test_second_question_on_same_image_skips_the_encoder(golden_models: dict, golden_dir: Path, monkeypatch) -> None:
    model, config = golden_models["tiny-a"]
    golden = load_file(str(golden_dir / "tiny-a" / "golden.safetensors"))
    counter = CountingEncoder(model)
    monkeypatch.setattr(model, "encode_images", counter)
    engine = Engine(model, config)
    params = SamplingParams(temperature=0.0, max_new_tokens=3)
    args = (golden["input_ids"][0], golden["pixel_values"], golden["image_grid_hws"], params)
    first = engine.generate_ids(*args, stop_ids=())
    assert list(first) == golden["generated_ids"][:3].tolist()
    assert counter.calls == [56] and first.stats.images_encoded == 2
    second = engine.generate_ids(*args, stop_ids=())
    assert list(second) == golden["generated_ids"][:3].tolist()
    assert counter.calls == [56] and second.stats.images_encoded == 0  # not called again
    assert len(engine.feature_cache) == 2


def test_patch_budget_splits_encoder_calls_without_changing_features(golden_models: dict, golden_dir: Path) -> None:
    model, _ = golden_models["tiny-a"]
    golden = load_file(str(golden_dir / "tiny-a" / "golden.safetensors"))
    pv, grids = golden["pixel_values"], golden["image_grid_hws"]  # 24 + 32 patches
    counter = CountingEncoder(model)

    def encode(p: torch.Tensor, g: torch.Tensor) -> list[torch.Tensor]:
        return list(counter(p, g).split([int(h * w) // 4 for h, w in g]))

    whole, n = encode_images(encode, pv, grids, patch_budget=1000)
    assert counter.calls == [56] and n == 2
    split, n = encode_images(encode, pv, grids, patch_budget=30)
    assert counter.calls == [56, 24, 32] and n == 2
    for a, b in zip(whole, split, strict=True):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=0)
    torch.testing.assert_close(torch.cat(whole), golden["projector_out"], atol=2e-5, rtol=1e-4)


def test_feature_cache_is_lru_bounded_by_bytes() -> None:
    cache = FeatureCache(max_bytes=3 * 40)  # three [10] fp32 tensors
    for k in "abc":
        cache.put(k, torch.zeros(10))
    assert cache.get("a") is not None  # a is now most recent
    cache.put("d", torch.zeros(10))
    assert cache.get("b") is None and {k for k in "acd" if cache.get(k) is not None} == set("acd")
    assert cache.bytes == 120
    cache.put("huge", torch.zeros(100))  # larger than the cap: not kept, nothing evicted
    assert cache.get("huge") is None and len(cache) == 3


def test_image_key_depends_on_pixels_and_grid() -> None:
    pv = torch.rand(8, 3, 14, 14)
    assert image_key(pv, (2, 4)) == image_key(pv.clone(), (2, 4))
    assert image_key(pv, (2, 4)) != image_key(pv, (4, 2))
    changed = pv.clone()
    changed[3, 1, 2, 2] += 1e-3
    assert image_key(pv, (2, 4)) != image_key(changed, (2, 4))
