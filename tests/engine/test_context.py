"""Context guard: fits, caps new tokens, and says what each input cost when it does not fit."""

from __future__ import annotations

from pathlib import Path

import pytest
from safetensors.torch import load_file

from kimivl_cli.cli.flags import error_line
from kimivl_cli.engine.context import describe_costs, plan_context
from kimivl_cli.engine.engine import Engine
from kimivl_cli.engine.sampling import SamplingParams
from kimivl_cli.errors import InputError


def test_new_tokens_are_capped_to_the_context_left() -> None:
    plan = plan_context(100, [30, 20], max_new_tokens=500, model_context=200)
    assert plan.prompt_tokens == 150 and plan.max_new_tokens == 50 and plan.cache_len == 200
    plan = plan_context(100, [], max_new_tokens=10, model_context=200, max_context=1000)
    assert plan.limit == 200 and plan.max_new_tokens == 10


def test_overflow_error_lists_text_and_each_image() -> None:
    with pytest.raises(InputError) as err:
        plan_context(120, [1080, 256], max_new_tokens=10, model_context=131072, max_context=1000)
    message = error_line(err.value)  # as the CLI prints it: fields as flags
    assert "1,456 tokens" in message and "--max-context is 1,000" in message
    assert "text 120 tokens, image 1 1,080, image 2 256" in message


def test_many_images_are_summarised_biggest_first() -> None:
    costs = [10] * 20 + [500]
    text = describe_costs(7, costs)
    assert "image 21 500" in text and "13 more images 130" in text


def test_engine_refuses_before_any_work(golden_models: dict, golden_dir: Path) -> None:
    model, config = golden_models["tiny-a"]
    golden = load_file(str(golden_dir / "tiny-a" / "golden.safetensors"))
    engine = Engine(model, config)
    with pytest.raises(InputError, match=r"text 33 tokens, image 1 6, image 2 8"):
        engine.generate_ids(
            golden["input_ids"][0],
            golden["pixel_values"],
            golden["image_grid_hws"],
            SamplingParams(max_new_tokens=5),
            max_context=40,
        )
    assert len(engine.feature_cache) == 0
