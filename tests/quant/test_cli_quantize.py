"""`kimivl quantize` in process: writes a loadable checkpoint, refuses to overwrite, bad mode exits 2."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import typer
from typer.testing import CliRunner

from kimivl_cli.cli import quantize
from kimivl_cli.cli.flags import error_line
from kimivl_cli.errors import CheckpointError, InputError
from kimivl_cli.model.weights import load_model
from kimivl_cli.quant.modules import NF4Linear
from kimivl_cli.testing.checkpoint import cached_checkpoint


def _app() -> typer.Typer:
    app = typer.Typer()
    quantize.register(app)

    @app.callback()
    def _root() -> None:  # keep `quantize` a subcommand
        pass

    return app


def test_quantize_writes_a_checkpoint_that_loads_quantized(tmp_path: Path) -> None:
    src, dst = cached_checkpoint("small"), tmp_path / "out"
    result = CliRunner().invoke(_app(), ["quantize", str(src), str(dst)])
    assert result.exit_code == 0, result.output
    assert f"wrote {dst} (nf4" in result.output
    model, _ = load_model(dst, dtype=torch.bfloat16)
    assert isinstance(model.language_model.model.layers[0].self_attn.o_proj, NF4Linear)

    again = CliRunner().invoke(_app(), ["quantize", str(src), str(dst)])
    assert isinstance(again.exception, InputError) and "--force" in error_line(again.exception)
    assert CliRunner().invoke(_app(), ["quantize", str(src), str(dst), "--force"]).exit_code == 0

    bad = CliRunner().invoke(_app(), ["quantize", str(src), str(tmp_path / "x"), "--quant", "nf2"])
    assert isinstance(bad.exception, InputError) and not (tmp_path / "x").exists()


def test_nf4_on_dims_that_are_not_multiples_of_64_is_a_checkpoint_error() -> None:
    with pytest.raises(CheckpointError, match="cannot be quantized as nf4"):
        load_model(cached_checkpoint("tiny"), quant="nf4")
