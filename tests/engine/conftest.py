"""Engines over the golden tiny checkpoints (no tokenizer) and a generated tiny one (with tokenizer).

Models load once per session in fp32; tests that change engine settings build a fresh `Engine`
around the same model (cheap: the engine holds no per-request state but its feature cache).
One torch thread comes from the root conftest (OpenMP workers spinning against other processes
on a shared 2-core box made tiny decode steps ~25x slower).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image

from kimivl_cli.engine.engine import Engine
from kimivl_cli.model.weights import load_model


@pytest.fixture(scope="session")
def tiny_engine(tiny_checkpoint: Path) -> Engine:
    return Engine.load(tiny_checkpoint, dtype=torch.float32)


@pytest.fixture(scope="session")
def golden_models(golden_dir: Path) -> dict:
    """name -> (model, config) for the reference checkpoints tiny-a and tiny-b."""
    return {name: load_model(golden_dir / name, dtype=torch.float32) for name in ("tiny-a", "tiny-b")}


@pytest.fixture(scope="session")
def photos() -> list[Image.Image]:
    """Three small deterministic RGB images of different shapes (grids 4x4, 2x6, 6x4 on the tiny model)."""
    g = torch.Generator().manual_seed(7)
    sizes = [(50, 50), (84, 28), (50, 80)]
    return [Image.fromarray(torch.randint(0, 256, (h, w, 3), generator=g, dtype=torch.uint8).numpy()) for w, h in sizes]
