"""Hostile checkpoints: files outside the folder, configs that divide by zero or ask for 64 GB,
JSON nested past any parser, tokenizers cut short, safetensors headers that lie."""

from __future__ import annotations

import json
import os
import shutil
import struct
import threading
from pathlib import Path

import pytest

from tests.hostile.conftest import nested_json, refused, safetensors_bytes, write_json

ASK = ("ask", "--max-tokens", "1", "--device", "cpu", "--quant", "none", "--model")


def ask(kimivl, folder: Path):
    return kimivl(*ASK, folder, "hi")


def _header(path: Path) -> tuple[dict, int]:
    raw = path.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    return json.loads(raw[8 : 8 + n]), 8 + n


def _index_to(checkpoint: Path, shard: str, keys: list[str]) -> None:
    write_json(checkpoint / "model.safetensors.index.json", {"weight_map": dict.fromkeys(keys, shard)})


def _keys(path: Path) -> list[str]:
    return [key for key in _header(path)[0] if key != "__metadata__"]


# --- 1. files outside the checkpoint folder ------------------------------------------------------


def test_index_naming_a_shard_outside_the_folder_is_refused(kimivl, checkpoint: Path, tmp_path: Path) -> None:
    other = tmp_path / "other"
    other.mkdir()
    keys = _keys(checkpoint / "model.safetensors")
    shutil.move(checkpoint / "model.safetensors", other / "model.safetensors")  # a real, loadable shard
    for name in ("../other/model.safetensors", str(other / "model.safetensors")):
        _index_to(checkpoint, name, keys)
        refused(ask(kimivl, checkpoint), "resolves outside the checkpoint folder")


def test_a_shard_linked_out_of_the_folder_is_refused(kimivl, checkpoint: Path, tmp_path: Path) -> None:
    keys = _keys(checkpoint / "model.safetensors")
    shutil.move(checkpoint / "model.safetensors", tmp_path / "elsewhere.safetensors")
    (checkpoint / "model.safetensors").symlink_to(tmp_path / "elsewhere.safetensors")
    refused(ask(kimivl, checkpoint), "'model.safetensors' resolves outside")
    (checkpoint / "model.safetensors").unlink()
    (checkpoint / "shard.safetensors").symlink_to(tmp_path / "elsewhere.safetensors")
    _index_to(checkpoint, "shard.safetensors", keys)
    refused(ask(kimivl, checkpoint), "resolves outside")


def test_links_inside_the_folder_and_hub_cache_blobs_load(kimivl, checkpoint: Path, tmp_path: Path) -> None:
    """Symlinks are not refused as such: one to a file in the folder loads, and so does a Hub cache
    snapshot, whose every file links into the repo's blobs/ folder."""
    (checkpoint / "weights").mkdir()
    shutil.move(checkpoint / "model.safetensors", checkpoint / "weights" / "w.safetensors")
    (checkpoint / "model.safetensors").symlink_to("weights/w.safetensors")
    assert ask(kimivl, checkpoint).returncode == 0
    repo = tmp_path / "hub" / "models--x--y"
    snapshot = repo / "snapshots" / ("a" * 40)
    snapshot.mkdir(parents=True)
    (repo / "blobs").mkdir()
    for i, path in enumerate(sorted(checkpoint.iterdir())):
        if path.is_file():
            shutil.copyfile(path, repo / "blobs" / f"blob{i}")
            (snapshot / path.name).symlink_to(f"../../blobs/blob{i}")
    result = ask(kimivl, snapshot)
    assert result.returncode == 0, result.stderr


def test_errors_never_echo_file_contents(kimivl, checkpoint: Path, tmp_path: Path) -> None:
    secret = tmp_path / "inside-secret"
    secret.write_bytes(b"rootpw:hunter2\n" * 3)
    shutil.copyfile(secret, checkpoint / "model.safetensors")  # inside the folder: read, but never quoted
    line = refused(ask(kimivl, checkpoint), "not a readable safetensors file")
    number = str(int.from_bytes(b"rootpw:h", "little"))
    assert number not in line and "hunter2" not in line and "rootpw" not in line


# --- 10. configs, tokenizers and headers that lie ------------------------------------------------


@pytest.mark.parametrize(
    ("section", "field", "value", "needle"),
    [
        ("text_config", "n_group", 0, "n_group must be at least 1"),
        ("vision_config", "num_attention_heads", 0, "num_attention_heads must be at least 1"),
        ("text_config", "moe_layer_freq", 0, "moe_layer_freq must be at least 1"),
        ("text_config", "hidden_size", -64, "hidden_size must be at least 1"),
        ("text_config", "hidden_size", 10**9, "config.json implies"),  # would allocate 64 GB
        ("text_config", "num_hidden_layers", 10**7, "holds only"),  # would build ten million layers
        ("text_config", "n_routed_experts", 10**8, "holds only"),
        ("text_config", "vocab_size", 0, "vocab_size must be at least 1"),
        ("text_config", "max_position_embeddings", 10**15, "implausibly large"),
        ("text_config", "rms_norm_eps", float("nan"), "finite"),
        ("text_config", "rope_theta", float("inf"), "finite"),
        ("text_config", "qk_rope_head_dim", 7, "even"),
        ("text_config", "num_experts_per_tok", 9, "num_experts_per_tok"),
        ("text_config", "hidden_size", True, "should be int"),
        ("text_config", "rope_scaling", {"type": "yarn", "factor": 0, "original_max_position_embeddings": 8}, "factor"),
        (
            "text_config",
            "rope_scaling",
            {"type": "yarn", "factor": 2, "original_max_position_embeddings": 0},
            "original",
        ),
        ("vision_config", "merge_kernel_size", [2, 0], "merge_kernel_size"),
        (None, "media_placeholder_token_id", 5, "<|media_pad|>"),
    ],
)
def test_bad_config_values(kimivl, edit_config, section, field: str, value, needle: str) -> None:
    refused(ask(kimivl, edit_config(section, **{field: value})), needle)


@pytest.mark.parametrize("name", ["config.json", "model.safetensors.index.json", "tokenizer_config.json"])
def test_json_nested_past_any_parser(kimivl, checkpoint: Path, name: str) -> None:
    (checkpoint / name).write_text(nested_json(100_000))
    refused(ask(kimivl, checkpoint), "nested too deeply")


def test_generation_and_preprocessor_configs_nested_too(kimivl, checkpoint: Path) -> None:
    for name in ("generation_config.json", "preprocessor_config.json"):
        original = (checkpoint / name).read_text()
        (checkpoint / name).write_text('{"a": ' + nested_json(50_000) + "}")
        refused(ask(kimivl, checkpoint), name, "nested too deeply")
        (checkpoint / name).write_text(original)


def test_added_tokens_decoder_as_a_list(kimivl, checkpoint: Path) -> None:
    path = checkpoint / "tokenizer_config.json"
    config = json.loads(path.read_text())
    config["added_tokens_decoder"] = list(config["added_tokens_decoder"].values())
    write_json(path, config)
    refused(ask(kimivl, checkpoint), "added_tokens_decoder must be an object")


@pytest.mark.parametrize(
    ("cut", "needle"),
    [
        (lambda lines: [], "tiktoken.model is empty"),
        (lambda lines: lines[: len(lines) // 2], "does not fit config.json's vocab_size"),  # cut at a line end
        (lambda lines: [*lines[:10], lines[10][:3]], "not a tiktoken line"),  # cut inside a line
    ],
)
def test_tiktoken_model_cut_short(kimivl, checkpoint: Path, cut, needle: str) -> None:
    path = checkpoint / "tiktoken.model"
    lines = path.read_bytes().splitlines()
    path.write_bytes(b"\n".join(cut(lines)))
    refused(ask(kimivl, checkpoint), needle)


def test_preprocessor_that_disagrees_with_the_vision_tower(kimivl, checkpoint: Path) -> None:
    path = checkpoint / "preprocessor_config.json"
    config = json.loads(path.read_text())
    write_json(path, {**config, "patch_size": 16})
    refused(ask(kimivl, checkpoint), "disagrees with config.json")
    write_json(path, {**config, "in_token_limit": 10**12})  # would skip every downscale
    refused(ask(kimivl, checkpoint), "in_token_limit")


def _rewrite(path: Path, edit) -> None:
    header, start = _header(path)
    data = path.read_bytes()[start:]
    header, data = edit(header, data)
    path.write_bytes(safetensors_bytes(header, data))


def test_overlapping_tensors_are_refused(kimivl, checkpoint: Path) -> None:
    def overlap(header: dict, data: bytes):
        keys = [k for k in header if k != "__metadata__"]
        a, b = sorted(keys, key=lambda k: header[k]["data_offsets"][0])[:2]
        size = header[b]["data_offsets"][1] - header[b]["data_offsets"][0]
        header[b]["data_offsets"] = [header[a]["data_offsets"][0], header[a]["data_offsets"][0] + size]
        return header, data

    _rewrite(checkpoint / "model.safetensors", overlap)
    refused(ask(kimivl, checkpoint), "tensors overlap")


def test_float_weights_stored_as_integers_are_refused(kimivl, checkpoint: Path) -> None:
    import torch
    from safetensors.torch import load_file, save_file

    path = checkpoint / "model.safetensors"
    tensors = load_file(path)
    key = "language_model.model.norm.weight"
    tensors[key] = (tensors[key] * 1000).to(torch.int16)  # the right shape, values that would be cast silently
    save_file(tensors, path)
    refused(ask(kimivl, checkpoint), key, "stored as int16", "floating-point")


@pytest.mark.parametrize(
    ("payload", "needle"),
    [
        (struct.pack("<Q", 2**62) + b"{}", "header length does not fit"),
        (struct.pack("<Q", 6) + b"[1, 2]", "not a JSON object"),
        (struct.pack("<Q", 5) + b"{not}", "not valid JSON"),
        (safetensors_bytes({"a": {"dtype": "F99", "shape": [1], "data_offsets": [0, 4]}}, b"\0" * 4), "unknown dtype"),
        (safetensors_bytes({"a": {"dtype": "F32", "shape": [1.5], "data_offsets": [0, 4]}}, b"\0" * 4), "integers"),
        (safetensors_bytes({"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}, b"\0" * 4), "past the end"),
        (safetensors_bytes({"__metadata__": {"a": 1}}, b""), "__metadata__"),
        (struct.pack("<Q", 100_002) + nested_json(50_000).encode() + b"  ", "nested too deeply"),
    ],
)
def test_lying_safetensors_headers(kimivl, checkpoint: Path, payload: bytes, needle: str) -> None:
    (checkpoint / "model.safetensors").write_bytes(payload)
    refused(ask(kimivl, checkpoint), needle)


def test_checkpoint_files_that_are_fifos_do_not_hang(kimivl, checkpoint: Path) -> None:
    for name, needle in (("config.json", "not a regular file"), ("model.safetensors", "not a regular file")):
        original = checkpoint / f"{name}.orig"
        (checkpoint / name).rename(original)
        os.mkfifo(checkpoint / name)
        timer = threading.Timer(30, lambda p=checkpoint / name: open(p, "wb").close())  # unblocks a hang, fails it
        timer.start()
        try:
            refused(ask(kimivl, checkpoint), needle)
        finally:
            timer.cancel()
        (checkpoint / name).unlink()
        original.rename(checkpoint / name)


def test_weights_larger_than_memory_are_a_runtime_error(kimivl, checkpoint: Path, monkeypatch) -> None:
    from kimivl_cli.model import weights

    monkeypatch.setattr(weights, "device_memory_bytes", lambda device: 1 << 20)  # a 1 MiB machine
    refused(ask(kimivl, checkpoint), "need", "--quant nf4", code=1)


# --- options past their ranges (the engine's settings, whichever command sets them) -----------------


@pytest.mark.parametrize(
    ("option", "value", "needle"),
    [
        ("--seed", str(2**70), "seed must be an integer that fits 64 bits"),
        ("--seed", str(-(2**64)), "seed must be an integer that fits 64 bits"),
        ("--temperature", "inf", "temperature must be a number >= 0"),
        ("--top-p", "nan", "--top-p"),
    ],
)
def test_sampling_options_past_their_range(kimivl, tiny_checkpoint: Path, option: str, value: str, needle: str) -> None:
    refused(kimivl(*ASK, tiny_checkpoint, option, value, "hi"), needle)
