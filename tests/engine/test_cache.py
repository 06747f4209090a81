"""The latent cache as the engine uses it: exact against a no-cache forward, and only R + Dr wide."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file

from kimivl_cli.engine.engine import Engine
from kimivl_cli.engine.sampling import SamplingParams
from kimivl_cli.model.cache import LatentCache


@torch.no_grad()
def test_cached_decode_equals_full_forward_for_64_steps(golden_models: dict, golden_dir: Path) -> None:
    model, config = golden_models["tiny-a"]
    golden = load_file(str(golden_dir / "tiny-a" / "golden.safetensors"))
    prompt = golden["input_ids"]
    engine = Engine(model, config, prefill_chunk=16)
    stream = engine.generate_ids(
        prompt[0],
        golden["pixel_values"],
        golden["image_grid_hws"],
        SamplingParams(temperature=0.0, max_new_tokens=64),
        stop_ids=(),
        keep_logits=True,
    )
    generated = torch.tensor([list(stream)])
    assert generated.shape[1] == 64
    # Reference: one forward over prompt + generated, no cache. Only the prompt's pads get image
    # features (a generated id may equal the placeholder id by chance).
    lm = model.language_model
    features = model.encode_images(golden["pixel_values"], golden["image_grid_hws"])
    embeds = torch.cat((model.embed(prompt, features), lm.embed(generated)), dim=1)
    full = lm.logits(lm(embeds, 0))[0, prompt.shape[1] - 1 : -1]  # the 64 rows that picked each token
    cached = torch.stack(stream.logits)
    assert (cached - full).abs().max().item() <= 1e-4


def test_cache_is_latent_plus_rope_key_per_token_and_layer(golden_models: dict, golden_dir: Path) -> None:
    model, config = golden_models["tiny-a"]
    text = config.text
    golden = load_file(str(golden_dir / "tiny-a" / "golden.safetensors"))
    for dtype in (torch.float32, torch.bfloat16):
        cache = LatentCache(text, batch=1, max_len=100, dtype=dtype)
        assert cache.width * cache.buf.element_size() == (text.kv_lora_rank + text.qk_rope_head_dim) * dtype.itemsize
    # The engine's cache: exactly prompt + max_new_tokens slots of R + Dr values, per layer.
    stream = Engine(model, config).generate_ids(
        golden["input_ids"][0],
        golden["pixel_values"],
        golden["image_grid_hws"],
        SamplingParams(temperature=0.0, max_new_tokens=7),
        stop_ids=(),
    )
    list(stream)
    width = text.kv_lora_rank + text.qk_rope_head_dim  # 40 here; 576 for the real model
    slots = golden["input_ids"].shape[1] + 7
    assert stream.stats.cache_bytes == text.num_hidden_layers * slots * width * 4
