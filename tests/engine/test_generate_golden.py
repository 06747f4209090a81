"""The engine's own prefill + decode loop against the reference goldens (fp32, token-id level).

The goldens have no real tokenizer (tiny ids), so these drive `generate_ids` directly, with no
stop tokens, like the reference's 12-step greedy run.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from kimivl_cli.engine.engine import Engine
from kimivl_cli.engine.sampling import SamplingParams

GREEDY_12 = SamplingParams(temperature=0.0, max_new_tokens=12)


@pytest.mark.parametrize("name", ["tiny-a", "tiny-b"])
@pytest.mark.parametrize("chunk", [1024, 5])
def test_greedy_ids_equal_golden(golden_models: dict, golden_dir: Path, name: str, chunk: int) -> None:
    model, config = golden_models[name]
    golden = load_file(str(golden_dir / name / "golden.safetensors"))
    engine = Engine(model, config, prefill_chunk=chunk)  # chunk 5 cuts image runs across chunks
    stream = engine.generate_ids(
        golden["input_ids"][0],
        golden["pixel_values"],
        golden["image_grid_hws"],
        GREEDY_12,
        stop_ids=(),
        keep_logits=True,
    )
    assert list(stream) == golden["generated_ids"].tolist()
    torch.testing.assert_close(torch.stack(stream.logits), golden["decode_step_logits"], atol=1e-4, rtol=1e-4)
    stats = stream.stats
    assert stats.finish_reason == "length" and stats.generated_tokens == 12
    assert stats.prompt_tokens == golden["input_ids"].shape[1]
    assert stats.images_encoded == 2


def test_stop_token_ends_generation(golden_models: dict, golden_dir: Path) -> None:
    model, config = golden_models["tiny-a"]
    golden = load_file(str(golden_dir / "tiny-a" / "golden.safetensors"))
    expected = golden["generated_ids"].tolist()
    engine = Engine(model, config)
    stream = engine.generate_ids(
        golden["input_ids"][0], golden["pixel_values"], golden["image_grid_hws"], GREEDY_12, stop_ids=[expected[4]]
    )
    assert list(stream) == expected[:4]
    assert stream.stats.finish_reason == "stop"
