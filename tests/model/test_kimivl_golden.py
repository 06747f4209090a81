"""The language model against the reference goldens (fp32): hidden states, routing, logits, greedy decode.

The language-model checks take the image features from the golden `projector_out`, so they hold
whatever the vision tower does; the last test runs the whole model from pixels.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from kimivl_cli.errors import InputError
from kimivl_cli.model.cache import LatentCache
from kimivl_cli.model.config import KimiVLConfig
from kimivl_cli.model.language import LanguageModel
from kimivl_cli.model.weights import load_model, materialize
from kimivl_cli.testing.checkpoint import load_checkpoint
from kimivl_cli.testing.stages import record_stages

TOL = {"atol": 1e-4, "rtol": 1e-4}
CHECKPOINTS = ["tiny-a", "tiny-a-sharded", "tiny-b"]


def load_language_model(folder: Path) -> tuple[LanguageModel, KimiVLConfig]:
    cfg = KimiVLConfig.from_file(folder / "config.json")
    with torch.device("meta"):
        lm = LanguageModel(cfg.text)
    materialize(lm, torch.float32, "cpu")
    load_checkpoint(lm, folder, prefix="language_model.")
    return lm.eval(), cfg


@pytest.fixture(scope="module", params=CHECKPOINTS)
def case(request, golden_dir: Path):
    folder = golden_dir / request.param
    lm, cfg = load_language_model(folder)
    golden = load_file(str(golden_dir / request.param.removesuffix("-sharded") / "golden.safetensors"))
    ids = golden["input_ids"]
    with torch.no_grad():
        embeds = lm.embed(ids)
        embeds[ids == cfg.media_placeholder_token_id] = golden["projector_out"]
    return lm, cfg, golden, embeds


@torch.no_grad()
def test_full_forward_matches_reference(case) -> None:
    lm, _, golden, embeds = case
    with record_stages(lm) as stages:
        logits = lm.logits(lm(embeds, 0))
    torch.testing.assert_close(logits, golden["logits"], **TOL)
    torch.testing.assert_close(stages["hidden_states"], golden["hidden_states"], **TOL)
    routed = sorted(k for k in stages if k.startswith("router_topk_"))
    assert routed == sorted(k for k in golden if k.startswith("router_topk_"))
    for key in routed:
        if key.startswith("router_topk_idx."):
            assert torch.equal(stages[key], golden[key])
        else:
            torch.testing.assert_close(stages[key], golden[key], **TOL)


@torch.no_grad()
def test_greedy_cached_decode_matches_reference(case) -> None:
    lm, cfg, golden, embeds = case
    n_prompt = embeds.shape[1]
    cache = LatentCache(cfg.text, batch=1, max_len=n_prompt + 12, dtype=torch.float32)
    logits = lm.logits(lm(embeds, 0, cache)[:, -1])
    rows, ids = [logits], []
    for step in range(11):
        token = logits.argmax(-1)
        ids.append(int(token))
        logits = lm.logits(lm(lm.embed(token[:, None]), n_prompt + step, cache)[:, -1])
        rows.append(logits)
    ids.append(int(logits.argmax(-1)))
    assert ids == golden["generated_ids"].tolist()
    torch.testing.assert_close(torch.cat(rows), golden["decode_step_logits"], **TOL)


@pytest.mark.parametrize("name", ["tiny-a", "tiny-b"])
@torch.no_grad()
def test_whole_model_from_pixels_matches_reference(name: str, golden_dir: Path) -> None:
    model, cfg = load_model(golden_dir / name, dtype=torch.float32)
    golden = load_file(str(golden_dir / name / "golden.safetensors"))
    with record_stages(model) as stages:
        logits = model(golden["input_ids"], golden["pixel_values"], golden["image_grid_hws"])
    torch.testing.assert_close(stages["projector_out"], golden["projector_out"], atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(logits, golden["logits"], **TOL)
    torch.testing.assert_close(stages["hidden_states"], golden["hidden_states"], **TOL)
    # One placeholder too many (or too few) for the images is the user's error, said in one line.
    ids = golden["input_ids"].clone()
    ids[0, -1] = cfg.media_placeholder_token_id
    with pytest.raises(InputError, match="placeholder tokens but the images give"):
        model(ids, golden["pixel_values"], golden["image_grid_hws"])
    with pytest.raises(InputError, match="0 features"):
        model(golden["input_ids"])
