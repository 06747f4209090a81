"""record_stages: hooks that name each golden stage as the golden file does, gone when the block ends."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file

from kimivl_cli.golden import INPUTS
from kimivl_cli.model.weights import load_model
from kimivl_cli.testing.stages import record_stages


@torch.no_grad()
def test_every_golden_stage_is_recorded_in_its_layout_and_the_hooks_go_on_exit(golden_dir: Path) -> None:
    model, _ = load_model(golden_dir / "tiny-b", dtype=torch.float32)
    golden = load_file(str(golden_dir / "tiny-b" / "golden.safetensors"))
    with record_stages(model) as stages:
        model(golden["input_ids"], golden["pixel_values"], golden["image_grid_hws"])
    computed_apart = {*INPUTS, "logits", "decode_step_logits", "generated_ids"}
    assert sorted(stages) == sorted(k for k in golden if k not in computed_apart)
    assert {k: stages[k].shape for k in stages} == {k: golden[k].shape for k in stages}
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


@torch.no_grad()
def test_a_later_forward_replaces_the_stages_it_reaches(golden_dir: Path) -> None:
    model, _ = load_model(golden_dir / "tiny-a", dtype=torch.float32)
    golden = load_file(str(golden_dir / "tiny-a" / "golden.safetensors"))
    pixels, grids = golden["pixel_values"], golden["image_grid_hws"]
    first = int(grids[0].prod())
    with record_stages(model.vision_tower) as stages:
        model.vision_tower(pixels, grids)
        model.vision_tower(pixels[:first], grids[:1])
    assert sorted(k for k in stages if k.startswith("vision_tower_out.")) == ["vision_tower_out.0"]
    assert stages["vision_patch_embed"].shape[0] == first
