"""One list of quantization modes, checked in one place by every entry point."""

from __future__ import annotations

from pathlib import Path

import pytest

from kimivl_cli.errors import InputError
from kimivl_cli.model.weights import load_model, save_quantized
from kimivl_cli.quant import quant_mode
from kimivl_cli.tasks.backend import open_backend

ANY_MODE = "unknown quantization 'nf3' (use one of auto, none, nf4, int8)"


def _refusal(call) -> str:
    with pytest.raises(InputError) as refused:
        call()
    return refused.value.one_line()


def test_modes_are_case_blind() -> None:
    assert [quant_mode(m) for m in ("AUTO", "None", "nf4", "Int8")] == ["auto", "none", "nf4", "int8"]


def test_every_entry_point_refuses_in_the_same_words(tmp_path: Path) -> None:
    assert _refusal(lambda: open_backend("local", quant="nf3")) == ANY_MODE
    assert _refusal(lambda: load_model(tmp_path, quant="nf3")) == ANY_MODE
    saved = "unknown quantization 'none' (use one of nf4, int8)"
    assert _refusal(lambda: save_quantized(tmp_path, tmp_path / "q", "none")) == saved
