"""MoonViT against the reference goldens, plus the properties the goldens cannot show alone:
images never see each other, packing changes nothing, and oversized grids are refused."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from kimivl_cli.errors import InputError
from kimivl_cli.model import vision
from kimivl_cli.model.config import KimiVLConfig
from kimivl_cli.model.vision import MoonViT, apply_rope_2d, rope_2d
from kimivl_cli.testing.stages import record_stages

VISION_ATOL = 2e-5


def load_tower(ckpt: Path) -> MoonViT:
    cfg = KimiVLConfig.from_file(ckpt / "config.json")
    prefix = "vision_tower."
    weights = {
        k.removeprefix(prefix): v for k, v in load_file(ckpt / "model.safetensors").items() if k.startswith(prefix)
    }
    tower = MoonViT(cfg.vision).eval()
    tower.load_state_dict(weights, strict=True)
    return tower


@pytest.fixture(scope="module", params=["tiny-a", "tiny-b"])
def case(request, golden_dir: Path) -> tuple[MoonViT, dict[str, torch.Tensor]]:
    ckpt = golden_dir / request.param
    return load_tower(ckpt), load_file(ckpt / "golden.safetensors")


@torch.no_grad()
def test_stages_match_reference(case) -> None:
    tower, golden = case
    with record_stages(tower) as stages:
        merged = tower(golden["pixel_values"], golden["image_grid_hws"])
    for stage in ("vision_pos_emb", "vision_patch_embed", "vision_encoder_out"):
        torch.testing.assert_close(stages[stage], golden[stage], atol=VISION_ATOL, rtol=0, msg=stage)
    assert len(merged) == golden["image_grid_hws"].shape[0]
    for i, out in enumerate(merged):
        torch.testing.assert_close(out, golden[f"vision_tower_out.{i}"], atol=VISION_ATOL, rtol=0)


@torch.no_grad()
def test_packed_images_equal_each_image_alone(case) -> None:
    tower, golden = case
    pixels, grids = golden["pixel_values"], golden["image_grid_hws"]
    packed = tower(pixels, grids)
    sizes = (grids[:, 0] * grids[:, 1]).tolist()
    for i, pix in enumerate(pixels.split(sizes)):
        (alone,) = tower(pix, grids[i : i + 1])
        torch.testing.assert_close(packed[i], alone, atol=1e-6, rtol=0)


@torch.no_grad()
def test_no_attention_across_images(case) -> None:
    """Scrambling image 2's pixels must leave image 1 bit-identical (the reference's eager path fails this)."""
    tower, golden = case
    pixels, grids = golden["pixel_values"].clone(), golden["image_grid_hws"]
    first = int(grids[0, 0] * grids[0, 1])
    before = tower(pixels, grids)
    pixels[first:] = torch.randn_like(pixels[first:]) * 3
    after = tower(pixels, grids)
    assert torch.equal(before[0], after[0])
    assert not torch.allclose(before[1], after[1])


@torch.no_grad()
def test_query_blocks_do_not_change_the_result(case, monkeypatch) -> None:
    tower, golden = case
    whole = tower(golden["pixel_values"], golden["image_grid_hws"])
    monkeypatch.setattr(vision, "ATTN_BLOCK_ELEMENTS", 7 * tower.config.num_attention_heads * 60)  # ragged blocks
    blocked = tower(golden["pixel_values"], golden["image_grid_hws"])
    for a, b in zip(whole, blocked, strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0)


def test_rope_pairs_turn_with_column_then_row() -> None:
    head_dim, theta = 8, 10000.0
    rot = rope_2d(3, 5, head_dim, theta)  # grid h=3, w=5
    assert rot.shape == (15, head_dim // 2) and rot.dtype == torch.complex64
    y, x = 2, 3
    angles = rot[y * 5 + x].angle()
    f1 = theta ** (-4 / head_dim)
    expected = torch.tensor([x * 1.0, y * 1.0, x * f1, y * f1])
    torch.testing.assert_close(angles, expected)
    # adjacent dims (0, 1) form the first complex entry: rotating (1, 0) by x*f0 = 3 rad
    q = torch.zeros(15, 1, head_dim)
    q[:, :, 0] = 1.0
    out = apply_rope_2d(q, rot)[y * 5 + x, 0]
    torch.testing.assert_close(out[:2], torch.tensor([torch.cos(torch.tensor(3.0)), torch.sin(torch.tensor(3.0))]))
    assert torch.all(out[2:] == 0)


@torch.no_grad()
def test_bf16_tower_runs_in_its_dtype(case) -> None:
    tower, golden = case
    ref = tower(golden["pixel_values"], golden["image_grid_hws"])
    low = MoonViT(tower.config).eval()
    low.load_state_dict(tower.state_dict())
    low.to(torch.bfloat16)
    with record_stages(low) as stages:
        out = low(golden["pixel_values"], golden["image_grid_hws"])
    assert stages["vision_pos_emb"].dtype == torch.bfloat16
    for a, b in zip(ref, out, strict=True):
        assert b.dtype == torch.bfloat16
        assert (a - b.float()).abs().max() < 0.1 * a.abs().max()


def test_grid_beyond_position_range_is_an_input_error(case) -> None:
    tower, _ = case
    side = tower.config.rope_max_side
    pixels = torch.zeros(side * 2, 3, 14, 14)
    with pytest.raises(InputError, match="beyond the vision position range"):
        tower(pixels, torch.tensor([[2, side]]))


@pytest.mark.parametrize(
    ("grids", "n", "message"),
    [
        ([[2, 4]], 7, "covers 8 patches"),
        ([[3, 4]], 12, "merge kernel"),
        ([2, 4], 8, "shape"),
        (torch.zeros(0, 2, dtype=torch.long), 0, "no images"),
    ],
)
def test_inconsistent_inputs_are_input_errors(case, grids, n, message) -> None:
    tower, _ = case
    with pytest.raises(InputError, match=message):
        tower(torch.zeros(n, 3, 14, 14), torch.as_tensor(grids))
