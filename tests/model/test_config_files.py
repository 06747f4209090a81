"""The four JSON configs of a checkpoint go through one reader: the same refusals in the same words."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from kimivl_cli.engine.sampling import INSTRUCT_DEFAULTS, SamplingParams
from kimivl_cli.errors import CheckpointError
from kimivl_cli.model.config import KimiVLConfig
from kimivl_cli.processor.image import ImageProcessorConfig
from kimivl_cli.processor.tokenizer import Tokenizer

LOADERS = {
    "config.json": KimiVLConfig.from_file,
    "preprocessor_config.json": ImageProcessorConfig.from_file,
    "tokenizer_config.json": lambda path: Tokenizer.from_dir(path.parent),
    "generation_config.json": lambda path: SamplingParams.from_checkpoint(path.parent, thinking=False),
}


@pytest.fixture
def folder(tiny_checkpoint: Path, tmp_path: Path) -> Path:
    shutil.copy(tiny_checkpoint / "tiktoken.model", tmp_path)
    return tmp_path


@pytest.mark.parametrize("name", LOADERS)
@pytest.mark.parametrize(
    ("payload", "needle"),
    [("[1, 2]", "top level is not a JSON object"), ("{not}", "not valid JSON"), ("\udcff", "not UTF-8")],
)
def test_every_config_is_refused_alike(folder: Path, name: str, payload: str, needle: str) -> None:
    path = folder / name
    path.write_bytes(payload.encode("utf-8", "surrogateescape"))
    with pytest.raises(CheckpointError) as refused:
        LOADERS[name](path)
    assert refused.value.message.startswith(f"{path}: ") and needle in refused.value.message


@pytest.mark.parametrize("name", [n for n in LOADERS if n != "generation_config.json"])
def test_a_missing_config_is_named(folder: Path, name: str) -> None:
    with pytest.raises(CheckpointError, match=f"{folder / name}: no {name}"):
        LOADERS[name](folder / name)


def test_generation_config_is_optional(folder: Path) -> None:
    params = SamplingParams.from_checkpoint(folder, thinking=False)
    assert (params.temperature, params.max_new_tokens) == (
        INSTRUCT_DEFAULTS["temperature"],
        INSTRUCT_DEFAULTS["max_new_tokens"],
    )
