"""Engines over the golden tiny checkpoints (no tokenizer) and a generated tiny one (with tokenizer).

Models load once per session in fp32; tests that change engine settings build a fresh `Engine`
around the same model (cheap: the engine holds no per-request state but its feature cache).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image

from kimivl_cli.engine.engine import Engine
from kimivl_cli.model.weights import load_model
from kimivl_cli.testing.checkpoint import cached_checkpoint


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models on a shared 2-core box: OpenMP workers spinning against other processes made
    decode steps ~25x slower than one thread. Restored after each test."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tiny_ckpt() -> Path:
    return cached_checkpoint("tiny", seed=0)


@pytest.fixture(scope="session")
def tiny_engine(tiny_ckpt: Path) -> Engine:
    return Engine.load(tiny_ckpt, dtype=torch.float32)


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
