"""Write official-format Kimi-VL checkpoints with random weights, for tests, demos and benchmarks.

A folder written here looks like the Hub repo: `config.json` (with the remote-code `auto_map`),
`model.safetensors` or shards + `model.safetensors.index.json`, `preprocessor_config.json`,
`tiktoken.model` (a small real BPE learned by `bpe.py`), `tokenizer_config.json` with the real
special-token names at the real relative ids, and `generation_config.json`.

Weights stream to disk tensor by tensor in fixed-size chunks (peak memory ~ one chunk, so the
16.4B-parameter `full` size works), and each tensor is seeded from (seed, name): the same seed
gives the same tensors whatever the sharding. Init keeps activations sane at any width:
linear weights N(0, 1/fan_in), norms 1 + 0.1 N, biases 0.05 N (like the golden initializer).

    python -m kimivl_cli.testing.checkpoint OUT_DIR [--size tiny|small|mid|full] [--seed N]
        [--shards N] [--dtype bf16|fp32] [--force] [--dry-run]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import shutil
import struct
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from kimivl_cli.errors import InputError
from kimivl_cli.model.config import KimiVLConfig, TextConfig, VisionConfig
from kimivl_cli.processor.image import ImageProcessorConfig
from kimivl_cli.testing.bpe import build_ranks, write_tiktoken_file
from kimivl_cli.testing.corpus import CORPUS

# Special tokens at their offsets from the first special id (= number of BPE ranks), as in the
# Moonshot tokenizer (offset 21 `<|media_pad|>` = 163605 in the real checkpoint).
SPECIAL_TOKEN_OFFSETS = {
    "[BOS]": 0,
    "[EOS]": 1,
    "<|im_end|>": 2,
    "<|im_user|>": 3,
    "<|im_assistant|>": 4,
    "<|start_header_id|>": 6,
    "<|end_header_id|>": 7,
    "[EOT]": 9,
    "<|im_system|>": 10,
    "<|im_middle|>": 17,
    "<|media_start|>": 18,
    "<|media_content|>": 19,
    "<|media_end|>": 20,
    "<|media_pad|>": 21,
    "[UNK]": 254,
    "[PAD]": 255,
}
SPECIAL_IDS_IN_VOCAB = 256  # the model's vocab ends after [PAD], like the real 163584 + 256 = 163840
CHUNK_ELEMENTS = 1 << 22  # random numbers are drawn in chunks of this many (fixed: part of the seed contract)
DTYPES = {"bf16": (torch.bfloat16, "BF16", "bfloat16"), "fp32": (torch.float32, "F32", "float32")}


def _vision(hidden: int, layers: int, heads: int, inter: int, pos: int) -> VisionConfig:
    return VisionConfig(hidden, layers, heads, inter, init_pos_emb_height=pos, init_pos_emb_width=pos)


def _model(vision: VisionConfig, **text: int) -> KimiVLConfig:
    """A config whose special ids sit where `make_checkpoint`'s tokenizer puts them."""
    base = text["vocab_size"] - SPECIAL_IDS_IN_VOCAB
    ids = {"bos_token_id": base, "eos_token_id": base + 1, "pad_token_id": base + SPECIAL_TOKEN_OFFSETS["[PAD]"]}
    media_pad = base + SPECIAL_TOKEN_OFFSETS["<|media_pad|>"]
    return KimiVLConfig(vision, TextConfig(**text, **ids), media_placeholder_token_id=media_pad)


_LATENT_TINY = {"kv_lora_rank": 32, "qk_nope_head_dim": 16, "qk_rope_head_dim": 8, "v_head_dim": 16}
_LATENT_SMALL = {"kv_lora_rank": 64, "qk_nope_head_dim": 32, "qk_rope_head_dim": 16, "v_head_dim": 32}
_LATENT_MID = {"kv_lora_rank": 256, "qk_nope_head_dim": 64, "qk_rope_head_dim": 32, "v_head_dim": 64}
_EXPERTS_TINY = {"n_routed_experts": 8, "n_shared_experts": 2, "num_experts_per_tok": 2}
_EXPERTS_SMALL = {
    "n_routed_experts": 16,
    "n_shared_experts": 1,
    "num_experts_per_tok": 4,
    "n_group": 4,
    "topk_group": 2,
}
_EXPERTS_MID = {"n_routed_experts": 64, "n_shared_experts": 2, "num_experts_per_tok": 6}
_DIMS = ("vocab_size", "hidden_size", "intermediate_size", "moe_intermediate_size", "num_hidden_layers")


def _dims(*values: int, heads: int) -> dict[str, int]:
    return {**dict(zip(_DIMS, values, strict=True)), "num_attention_heads": heads}


SIZES: dict[str, KimiVLConfig] = {
    # golden tiny-a's shapes; 979 BPE ranks put the special ids where the goldens' tiny ids are
    "tiny": _model(_vision(64, 2, 4, 128, 8), **_dims(1235, 64, 128, 32, 3, heads=4), **_LATENT_TINY, **_EXPERTS_TINY),
    # ~3M params with grouped routing, for fast end-to-end tests
    "small": _model(
        _vision(128, 2, 4, 256, 16), **_dims(2304, 128, 384, 64, 4, heads=4), **_LATENT_SMALL, **_EXPERTS_SMALL
    ),
    # ~1.1B params: the real routing shape (64 experts, top-6, 2 shared) for engine benchmarks
    "mid": _model(
        _vision(576, 4, 8, 2152, 64), **_dims(32768, 1024, 5632, 704, 8, heads=8), **_LATENT_MID, **_EXPERTS_MID
    ),
    # the real Kimi-VL-A3B config: 16,407,656,048 params
    "full": _model(VisionConfig(), **_dims(163840, 2048, 11264, 1408, 27, heads=16)),
}


@dataclass(frozen=True)
class TensorSpec:
    """One checkpoint tensor and its random init: mean + std * N(0, 1)."""

    name: str
    shape: tuple[int, ...]
    mean: float = 0.0
    std: float = 1.0

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


def _linear(name: str, out: int, inp: int, bias: bool = False) -> list[TensorSpec]:
    specs = [TensorSpec(f"{name}.weight", (out, inp), std=inp**-0.5)]
    return [*specs, TensorSpec(f"{name}.bias", (out,), std=0.05)] if bias else specs


def _layer_norm(name: str, dim: int) -> list[TensorSpec]:
    return [TensorSpec(f"{name}.weight", (dim,), 1.0, 0.1), TensorSpec(f"{name}.bias", (dim,), std=0.05)]


def _rms_norm(name: str, dim: int) -> TensorSpec:
    return TensorSpec(f"{name}.weight", (dim,), 1.0, 0.1)


def _mlp(name: str, hidden: int, inter: int) -> list[TensorSpec]:
    return [
        *_linear(f"{name}.gate_proj", inter, hidden),
        *_linear(f"{name}.up_proj", inter, hidden),
        *_linear(f"{name}.down_proj", hidden, inter),
    ]


def tensor_specs(cfg: KimiVLConfig) -> list[TensorSpec]:
    """Every tensor of the official state dict, with the reference module layout ([out, in] linears)."""
    return [*_vision_specs(cfg.vision), *_projector_specs(cfg), *_language_specs(cfg.text)]


def _vision_specs(v: VisionConfig) -> list[TensorSpec]:
    d, p = v.hidden_size, v.patch_size
    specs = [
        TensorSpec("vision_tower.patch_embed.proj.weight", (d, 3, p, p), std=(3 * p * p) ** -0.5),
        TensorSpec("vision_tower.patch_embed.proj.bias", (d,), std=0.05),
        TensorSpec("vision_tower.patch_embed.pos_emb.weight", (v.init_pos_emb_height, v.init_pos_emb_width, d)),
    ]
    for i in range(v.num_hidden_layers):
        block = f"vision_tower.encoder.blocks.{i}"
        specs += [
            *_layer_norm(f"{block}.norm0", d),
            *_layer_norm(f"{block}.norm1", d),
            *_linear(f"{block}.wqkv", 3 * d, d, bias=True),
            *_linear(f"{block}.wo", d, d, bias=True),
            *_linear(f"{block}.mlp.fc0", v.intermediate_size, d, bias=True),
            *_linear(f"{block}.mlp.fc1", d, v.intermediate_size, bias=True),
        ]
    return specs + _layer_norm("vision_tower.encoder.final_layernorm", d)


def _projector_specs(cfg: KimiVLConfig) -> list[TensorSpec]:
    d, kernel = cfg.vision.hidden_size, cfg.vision.merge_kernel_size
    merged = d * kernel[0] * kernel[1]
    return [
        *_layer_norm("multi_modal_projector.pre_norm", d),
        *_linear("multi_modal_projector.linear_1", merged, merged, bias=True),
        *_linear("multi_modal_projector.linear_2", cfg.text.hidden_size, merged, bias=True),
    ]


def _language_specs(t: TextConfig) -> list[TensorSpec]:
    h, lm = t.hidden_size, "language_model.model"
    specs = [TensorSpec(f"{lm}.embed_tokens.weight", (t.vocab_size, h), std=h**-0.5)]
    for i in range(t.num_hidden_layers):
        layer = f"{lm}.layers.{i}"
        specs += [_rms_norm(f"{layer}.input_layernorm", h), _rms_norm(f"{layer}.post_attention_layernorm", h)]
        specs += _attention_specs(t, f"{layer}.self_attn")
        specs += _moe_specs(t, f"{layer}.mlp") if t.is_moe_layer(i) else _mlp(f"{layer}.mlp", h, t.intermediate_size)
    specs.append(_rms_norm(f"{lm}.norm", h))
    return specs + _linear("language_model.lm_head", t.vocab_size, h)


def _attention_specs(t: TextConfig, attn: str) -> list[TensorSpec]:
    h, heads = t.hidden_size, t.num_attention_heads
    if t.q_lora_rank is None:
        specs = _linear(f"{attn}.q_proj", heads * t.qk_head_dim, h)
    else:
        specs = [
            *_linear(f"{attn}.q_a_proj", t.q_lora_rank, h),
            _rms_norm(f"{attn}.q_a_layernorm", t.q_lora_rank),
            *_linear(f"{attn}.q_b_proj", heads * t.qk_head_dim, t.q_lora_rank),
        ]
    return [
        *specs,
        *_linear(f"{attn}.kv_a_proj_with_mqa", t.kv_lora_rank + t.qk_rope_head_dim, h),
        _rms_norm(f"{attn}.kv_a_layernorm", t.kv_lora_rank),
        *_linear(f"{attn}.kv_b_proj", heads * (t.qk_nope_head_dim + t.v_head_dim), t.kv_lora_rank),
        *_linear(f"{attn}.o_proj", h, heads * t.v_head_dim),
    ]


def _moe_specs(t: TextConfig, mlp: str) -> list[TensorSpec]:
    h = t.hidden_size
    specs = [
        TensorSpec(f"{mlp}.gate.weight", (t.n_routed_experts, h), std=h**-0.5),
        TensorSpec(f"{mlp}.gate.e_score_correction_bias", (t.n_routed_experts,), std=0.1),
    ]
    for e in range(t.n_routed_experts):
        specs += _mlp(f"{mlp}.experts.{e}", h, t.moe_intermediate_size)
    if t.n_shared_experts:
        specs += _mlp(f"{mlp}.shared_experts", h, t.moe_intermediate_size * t.n_shared_experts)
    return specs


def count_params(cfg: KimiVLConfig) -> int:
    return sum(s.numel for s in tensor_specs(cfg))


def _tensor_seed(seed: int, name: str) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}:{name}".encode()).digest()[:8], "little") >> 1


def _chunks(spec: TensorSpec, seed: int, dtype: torch.dtype) -> Iterator[bytes]:
    """The tensor's bytes, drawn CHUNK_ELEMENTS at a time from its own generator."""
    gen = torch.Generator().manual_seed(_tensor_seed(seed, spec.name))
    for start in range(0, spec.numel, CHUNK_ELEMENTS):
        n = min(CHUNK_ELEMENTS, spec.numel - start)
        values = torch.randn(n, generator=gen).mul_(spec.std).add_(spec.mean).to(dtype)
        yield values.view(torch.uint8).numpy().tobytes()


def random_tensor(spec: TensorSpec, seed: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The tensor the generator writes for `spec` (for tests; holds the whole tensor)."""
    data = bytearray(b"".join(_chunks(spec, seed, dtype)))
    return torch.frombuffer(data, dtype=dtype).reshape(spec.shape)


def _write_safetensors(path: Path, specs: list[TensorSpec], seed: int, dtype_name: str) -> None:
    """Stream a safetensors file: header first (sizes are known), then each tensor's chunks."""
    dtype, st_dtype, _ = DTYPES[dtype_name]
    size = torch.tensor([], dtype=dtype).element_size()
    header: dict[str, object] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for spec in specs:
        header[spec.name] = {
            "dtype": st_dtype,
            "shape": list(spec.shape),
            "data_offsets": [offset, offset + spec.numel * size],
        }
        offset += spec.numel * size
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # data starts 8-byte aligned
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)) + blob)
        for spec in specs:
            for chunk in _chunks(spec, seed, dtype):
                f.write(chunk)


def _shard(specs: list[TensorSpec], shards: int) -> list[list[TensorSpec]]:
    """Split the key-sorted tensors into `shards` contiguous groups of about equal size."""
    total = sum(s.numel for s in specs)
    groups: list[list[TensorSpec]] = [[] for _ in range(shards)]
    done = 0
    for spec in specs:
        index = min(shards - 1, done * shards // max(total, 1))
        groups[index].append(spec)
        done += spec.numel
    return [g for g in groups if g]


def config_json(cfg: KimiVLConfig, dtype_name: str) -> dict:
    """`KimiVLConfig.to_dict()` plus the fields the real file carries (remote-code plumbing included)."""
    torch_dtype = DTYPES[dtype_name][2]
    d = cfg.to_dict()
    d["auto_map"] = {
        "AutoConfig": "configuration_kimi_vl.KimiVLConfig",
        "AutoModel": "modeling_kimi_vl.KimiVLForConditionalGeneration",
        "AutoModelForCausalLM": "modeling_kimi_vl.KimiVLForConditionalGeneration",
    }
    d.update(ignore_index=-100, pad_token_id=0, torch_dtype=torch_dtype, transformers_version="4.51.3")
    d["vision_config"]["torch_dtype"] = torch_dtype
    d["text_config"].update(
        num_nextn_predict_layers=0,
        ep_size=1,
        aux_loss_alpha=0.001,
        seq_aux=True,
        initializer_range=round(cfg.text.hidden_size**-0.5, 6),
        use_cache=True,
        pretraining_tp=1,
        attention_dropout=0.0,
        torch_dtype=torch_dtype,
    )
    return d


def special_tokens(num_base: int) -> dict[int, str]:
    return {num_base + offset: name for name, offset in SPECIAL_TOKEN_OFFSETS.items()}


def tokenizer_config_json(num_base: int) -> dict:
    added = {
        str(i): {
            "content": name,
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": True,
        }
        for i, name in sorted(special_tokens(num_base).items())
    }
    return {
        "added_tokens_decoder": added,
        "additional_special_tokens": [
            "<|im_end|>",
            "<|im_user|>",
            "<|im_assistant|>",
            "<|im_system|>",
            "<|im_middle|>",
        ],
        "auto_map": {"AutoTokenizer": ["tokenization_moonshot.TikTokenTokenizer", None]},
        "bos_token": "[BOS]",
        "clean_up_tokenization_spaces": False,
        "eos_token": "[EOS]",
        "extra_special_tokens": {},
        "model_max_length": 1048576,
        "pad_token": "[PAD]",
        "padding_side": "left",
        "tokenizer_class": "TikTokenTokenizer",
        "unk_token": "[UNK]",
    }


def preprocessor_config_json() -> dict:
    p = ImageProcessorConfig.official()
    return {
        "auto_map": {
            "AutoImageProcessor": "image_processing_kimi_vl.KimiVLImageProcessor",
            "AutoProcessor": "processing_kimi_vl.KimiVLProcessor",
        },
        "image_processor_type": "KimiVLImageProcessor",
        "processor_class": "KimiVLProcessor",
        "in_token_limit": p.in_token_limit,
        "patch_size": p.patch_size,
        "num_pooled_tokens": 1024,
        "merge_kernel_size": list(p.merge_kernel_size),
        "pad_input": p.pad_input,
        "image_mean": list(p.image_mean),
        "image_std": list(p.image_std),
    }


def _dump(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


_OUTPUT_GLOBS = ("model*.safetensors", "model.safetensors.index.json")


def make_checkpoint(
    out_dir: str | Path,
    size: str = "tiny",
    seed: int = 0,
    shards: int = 1,
    dtype: str = "fp32",
    force: bool = False,
) -> Path:
    """Write a complete checkpoint folder; returns its path. Time and disk ~ parameter count."""
    if size not in SIZES:
        raise InputError(f"unknown size {size!r}", f"choose one of {', '.join(SIZES)}")
    if dtype not in DTYPES:
        raise InputError(f"unknown dtype {dtype!r}", f"choose one of {', '.join(DTYPES)}")
    if shards < 1:
        raise InputError(f"--shards must be at least 1, got {shards}")
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()):
        if not force:
            raise InputError(f"{out} is not empty", "pass --force to write into it anyway")
        for pattern in _OUTPUT_GLOBS:  # stale shards from another layout would confuse loaders
            for stale in out.glob(pattern):
                stale.unlink()
    out.mkdir(parents=True, exist_ok=True)
    cfg = SIZES[size]
    num_base = cfg.text.vocab_size - SPECIAL_IDS_IN_VOCAB

    _dump(out / "config.json", config_json(cfg, dtype))
    _dump(out / "preprocessor_config.json", preprocessor_config_json())
    write_tiktoken_file(build_ranks(CORPUS, num_base), out / "tiktoken.model")
    _dump(out / "tokenizer_config.json", tokenizer_config_json(num_base))
    _dump(
        out / "generation_config.json",
        {
            "bos_token_id": cfg.text.bos_token_id,
            "eos_token_id": cfg.text.eos_token_id,
            "pad_token_id": cfg.text.pad_token_id,
            "transformers_version": "4.51.3",
        },
    )

    specs = sorted(tensor_specs(cfg), key=lambda s: s.name)
    if shards == 1:
        _write_safetensors(out / "model.safetensors", specs, seed, dtype)
        return out
    groups = _shard(specs, shards)
    weight_map: dict[str, str] = {}
    for i, group in enumerate(groups, 1):
        name = f"model-{i:05d}-of-{len(groups):05d}.safetensors"
        _write_safetensors(out / name, group, seed, dtype)
        weight_map.update({s.name: name for s in group})
    total = sum(s.numel for s in specs) * torch.tensor([], dtype=DTYPES[dtype][0]).element_size()
    _dump(out / "model.safetensors.index.json", {"metadata": {"total_size": total}, "weight_map": weight_map})
    return out


def _source_digest() -> str:
    here = Path(__file__).parent
    h = hashlib.sha256()
    for name in ("checkpoint.py", "bpe.py", "corpus.py"):
        h.update((here / name).read_bytes())
    return h.hexdigest()[:12]


def cached_checkpoint(size: str = "tiny", seed: int = 0, shards: int = 1, dtype: str = "fp32") -> Path:
    """A generated checkpoint shared by every test process (and reused across runs).

    Lives under $KIMIVL_CHECKPOINT_CACHE (default: <tmp>/kimivl-checkpoints), keyed by the
    arguments and a digest of the generator's source, so editing the generator invalidates it.
    Written to a private folder then renamed, so parallel workers never see half a checkpoint.
    """
    root = Path(os.environ.get("KIMIVL_CHECKPOINT_CACHE", Path(tempfile.gettempdir()) / "kimivl-checkpoints"))
    final = root / f"{size}-seed{seed}-shards{shards}-{dtype}-{_source_digest()}"
    if (final / "config.json").exists():
        return final
    root.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{final.name}-", dir=root))
    make_checkpoint(work, size, seed, shards, dtype, force=True)
    try:
        work.rename(final)
    except OSError:  # another process won the race; its copy is identical
        shutil.rmtree(work, ignore_errors=True)
    return final


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m kimivl_cli.testing.checkpoint",
        description="Write an official-format Kimi-VL checkpoint with random weights.",
    )
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--size", choices=list(SIZES), default="tiny")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--shards", type=int, default=1)
    parser.add_argument("--dtype", choices=list(DTYPES), default="bf16")
    parser.add_argument("--force", action="store_true", help="write into a non-empty folder")
    parser.add_argument("--dry-run", action="store_true", help="print parameter count and size, write nothing")
    args = parser.parse_args(argv)
    cfg = SIZES[args.size]
    params = count_params(cfg)
    nbytes = params * torch.tensor([], dtype=DTYPES[args.dtype][0]).element_size()
    summary = f"{args.size}: {params:,} parameters, {nbytes / 1e9:.3f} GB in {args.dtype}"
    if args.dry_run:
        print(summary)
        return 0
    try:
        out = make_checkpoint(args.out_dir, args.size, args.seed, args.shards, args.dtype, args.force)
    except InputError as exc:
        print(f"error: {exc.one_line()}", file=sys.stderr)
        return exc.exit_code
    print(f"wrote {out} ({summary})")
    return 0


if __name__ == "__main__":
    sys.exit(main())


@torch.no_grad()
def load_checkpoint(model: torch.nn.Module, folder: Path, prefix: str = "") -> None:
    """Stream the checkpoint in `folder` into `model`, whose root sits at official key `prefix`
    (e.g. `language_model.` to load the language model alone, as the goldens check it)."""
    from kimivl_cli.model.weights import (  # the loader imports bitsandbytes: not for the generator script
        SafetensorsFile,
        checkpoint_files,
        checkpoint_targets,
        plan_load,
        stored_quant,
        stream_tensors,
    )

    files = [SafetensorsFile(path) for path in checkpoint_files(folder)]
    targets = checkpoint_targets(model, prefix, stored_quantized=stored_quant(files) != "none")
    stream_tensors(targets, plan_load(targets, files, prefix), lambda done: None)
