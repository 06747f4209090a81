"""Projector against the reference goldens, and the per-piece LayerNorm that the math relies on."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from kimivl_cli.model.config import KimiVLConfig
from kimivl_cli.model.projector import Projector


@pytest.fixture(scope="module", params=["tiny-a", "tiny-b"])
def case(request, golden_dir: Path) -> tuple[Projector, dict[str, torch.Tensor]]:
    ckpt = golden_dir / request.param
    cfg = KimiVLConfig.from_file(ckpt / "config.json")
    prefix = "multi_modal_projector."
    weights = load_file(ckpt / "model.safetensors")
    projector = Projector(cfg.vision, cfg.text).eval()
    projector.load_state_dict({k.removeprefix(prefix): v for k, v in weights.items() if k.startswith(prefix)})
    return projector, load_file(ckpt / "golden.safetensors")


def tower_out(golden: dict[str, torch.Tensor]) -> torch.Tensor:
    n = golden["image_grid_hws"].shape[0]
    return torch.cat([golden[f"vision_tower_out.{i}"] for i in range(n)])


@torch.no_grad()
def test_projector_matches_reference(case) -> None:
    projector, golden = case
    out = projector(tower_out(golden))
    assert out.shape == golden["projector_out"].shape
    torch.testing.assert_close(out, golden["projector_out"], atol=2e-5, rtol=0)


@torch.no_grad()
def test_each_sub_patch_is_normalised_on_its_own(case) -> None:
    """Scaling one of the 4 sub-vectors leaves the output unchanged only if each is normalised alone."""
    projector, golden = case
    x = tower_out(golden)
    scaled = x.clone()
    scaled[:, 2] *= 7.0
    torch.testing.assert_close(projector(scaled), projector(x), atol=1e-4, rtol=0)  # eps and rounding only
