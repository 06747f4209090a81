"""A generated tiny checkpoint for tokenizer and chat tests (built once, cached across runs)."""

from __future__ import annotations

from pathlib import Path

import pytest

from kimivl_cli.processor.tokenizer import Tokenizer
from kimivl_cli.testing.checkpoint import cached_checkpoint


@pytest.fixture(scope="session")
def tiny_ckpt() -> Path:
    return cached_checkpoint("tiny", seed=0)


@pytest.fixture(scope="session")
def tokenizer(tiny_ckpt: Path) -> Tokenizer:
    return Tokenizer.from_dir(tiny_ckpt)
