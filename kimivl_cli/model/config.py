"""Model configuration parsed from the official `config.json`.

Only the fields the math needs are kept; `auto_map`, `architectures` and other
remote-code plumbing are ignored (we never execute checkpoint code). Missing or
ill-typed fields raise `CheckpointError` naming the field, so a broken
`config.json` is one clear line, not a KeyError.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from kimivl_cli.errors import CheckpointError
from kimivl_cli.guards import read_config, short_repr

MLP_PROJECTIONS = ("gate_proj", "up_proj", "down_proj")
"""The three linears of a SwiGLU MLP in the official checkpoint: dense MLPs, shared and routed experts."""

MAX_POSITIONS = 1 << 24
"""Most positions a config may claim: 128x the real model's 128K (the cache is sized from it)."""

_MISSING = object()


def _take(
    section: dict[str, Any], name: str, kind: type | tuple[type, ...], where: str, default: Any = _MISSING
) -> Any:
    """Read `section[name]` as `kind`, or fail with a message naming `where.name`."""
    if name not in section or (section[name] is None and default is not _MISSING):
        if default is _MISSING:
            raise CheckpointError(
                f"config.json: missing field {where}.{name}", "the checkpoint folder is incomplete or not Kimi-VL"
            )
        return default
    value = section[name]
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if (kind is int and isinstance(value, bool)) or not isinstance(value, kind):
        expected = " or ".join(k.__name__ for k in kind) if isinstance(kind, tuple) else kind.__name__
        raise CheckpointError(f"config.json: field {where}.{name} should be {expected}, got {short_repr(value)}")
    if kind is float and not math.isfinite(value):
        raise CheckpointError(f"config.json: field {where}.{name} should be a finite number, got {value!r}")
    return value


def _at_least(cfg: Any, where: str, low: int, *names: str) -> None:
    """Each named size of `cfg` is an integer >= low (0 or negative sizes would divide by zero or
    build empty tensors; the upper end is checked against the weights when loading)."""
    for name in names:
        value = getattr(cfg, name)
        if value is not None and value < low:
            raise CheckpointError(f"config.json: {where}.{name} must be at least {low}, got {value}")


def _positive_float(cfg: Any, where: str, *names: str) -> None:
    for name in names:
        if not getattr(cfg, name) > 0:
            raise CheckpointError(f"config.json: {where}.{name} must be above 0, got {getattr(cfg, name)!r}")


@dataclass(frozen=True)
class VisionConfig:
    """MoonViT: conv patch embedding, learned 2D position table, pre-norm ViT blocks, 2x2 merge."""

    hidden_size: int = 1152
    num_hidden_layers: int = 27
    num_attention_heads: int = 16
    intermediate_size: int = 4304
    patch_size: int = 14
    init_pos_emb_height: int = 64
    init_pos_emb_width: int = 64
    merge_kernel_size: tuple[int, int] = (2, 2)
    layer_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_max_side: int = 512

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> VisionConfig:
        where = "vision_config"
        merge = _take(d, "merge_kernel_size", list, where)
        if len(merge) != 2 or not all(isinstance(m, int) and not isinstance(m, bool) and m > 0 for m in merge):
            raise CheckpointError(
                f"config.json: {where}.merge_kernel_size should be two positive ints, got {short_repr(merge)}"
            )
        cfg = cls(
            hidden_size=_take(d, "hidden_size", int, where),
            num_hidden_layers=_take(d, "num_hidden_layers", int, where),
            num_attention_heads=_take(d, "num_attention_heads", int, where),
            intermediate_size=_take(d, "intermediate_size", int, where),
            patch_size=_take(d, "patch_size", int, where),
            init_pos_emb_height=_take(d, "init_pos_emb_height", int, where),
            init_pos_emb_width=_take(d, "init_pos_emb_width", int, where),
            merge_kernel_size=(merge[0], merge[1]),
        )
        _at_least(cfg, where, 1, *_INT_FIELDS[cls])
        if cfg.hidden_size % cfg.num_attention_heads or cfg.head_dim % 4:
            raise CheckpointError(
                f"config.json: {where}.hidden_size {cfg.hidden_size} must split into "
                f"{cfg.num_attention_heads} heads of a size divisible by 4 (2D RoPE)"
            )
        return cfg


@dataclass(frozen=True)
class RopeScaling:
    """YaRN long-context scaling (DeepSeek flavour); absent in Kimi-VL's own config."""

    factor: float
    original_max_position_embeddings: int
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float = 1.0
    mscale_all_dim: float = 0.0

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RopeScaling:
        where = "text_config.rope_scaling"
        kind = d.get("type", d.get("rope_type"))
        if kind != "yarn":
            raise CheckpointError(f"config.json: {where} type {kind!r} is not supported", "only 'yarn' or null")
        cfg = cls(
            factor=_take(d, "factor", float, where),
            original_max_position_embeddings=_take(d, "original_max_position_embeddings", int, where),
            beta_fast=_take(d, "beta_fast", float, where, 32.0),
            beta_slow=_take(d, "beta_slow", float, where, 1.0),
            mscale=_take(d, "mscale", float, where, 1.0),
            mscale_all_dim=_take(d, "mscale_all_dim", float, where, 0.0),
        )
        if not cfg.factor >= 1:
            raise CheckpointError(
                f"config.json: {where}.factor must be at least 1 (it stretches the context), got {cfg.factor}"
            )
        _at_least(cfg, where, 1, "original_max_position_embeddings")
        _positive_float(cfg, where, "beta_fast", "beta_slow")
        return cfg


@dataclass(frozen=True)
class TextConfig:
    """DeepSeek-V3 decoder: MLA attention, dense MLP for the first layers, then sigmoid-routed MoE."""

    vocab_size: int = 163840
    hidden_size: int = 2048
    intermediate_size: int = 11264
    moe_intermediate_size: int = 1408
    num_hidden_layers: int = 27
    num_attention_heads: int = 16
    q_lora_rank: int | None = None
    kv_lora_rank: int = 512
    qk_nope_head_dim: int = 128
    qk_rope_head_dim: int = 64
    v_head_dim: int = 128
    n_routed_experts: int = 64
    n_shared_experts: int = 2
    num_experts_per_tok: int = 6
    n_group: int = 1
    topk_group: int = 1
    norm_topk_prob: bool = True
    routed_scaling_factor: float = 2.446
    first_k_dense_replace: int = 1
    moe_layer_freq: int = 1
    rms_norm_eps: float = 1e-5
    rope_theta: float = 800000.0
    rope_scaling: RopeScaling | None = None
    max_position_embeddings: int = 131072
    tie_word_embeddings: bool = False
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    pad_token_id: int | None = None

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def cache_width(self) -> int:
        """Values cached per token and layer by MLA: the latent plus the shared rope key."""
        return self.kv_lora_rank + self.qk_rope_head_dim

    def is_moe_layer(self, layer: int) -> bool:
        return layer >= self.first_k_dense_replace and layer % self.moe_layer_freq == 0

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TextConfig:
        where = "text_config"
        _check_architecture(d, where)
        scaling = d.get("rope_scaling")
        optional_int = (int, type(None))
        cfg = cls(
            vocab_size=_take(d, "vocab_size", int, where),
            hidden_size=_take(d, "hidden_size", int, where),
            intermediate_size=_take(d, "intermediate_size", int, where),
            moe_intermediate_size=_take(d, "moe_intermediate_size", int, where),
            num_hidden_layers=_take(d, "num_hidden_layers", int, where),
            num_attention_heads=_take(d, "num_attention_heads", int, where),
            q_lora_rank=_take(d, "q_lora_rank", optional_int, where, None),
            kv_lora_rank=_take(d, "kv_lora_rank", int, where),
            qk_nope_head_dim=_take(d, "qk_nope_head_dim", int, where),
            qk_rope_head_dim=_take(d, "qk_rope_head_dim", int, where),
            v_head_dim=_take(d, "v_head_dim", int, where),
            n_routed_experts=_take(d, "n_routed_experts", int, where),
            n_shared_experts=_take(d, "n_shared_experts", int, where, 0),
            num_experts_per_tok=_take(d, "num_experts_per_tok", int, where),
            n_group=_take(d, "n_group", int, where, 1),
            topk_group=_take(d, "topk_group", int, where, 1),
            norm_topk_prob=_take(d, "norm_topk_prob", bool, where, True),
            routed_scaling_factor=_take(d, "routed_scaling_factor", float, where, 1.0),
            first_k_dense_replace=_take(d, "first_k_dense_replace", int, where, 0),
            moe_layer_freq=_take(d, "moe_layer_freq", int, where, 1),
            rms_norm_eps=_take(d, "rms_norm_eps", float, where, 1e-6),
            rope_theta=_take(d, "rope_theta", float, where, 10000.0),
            rope_scaling=RopeScaling.from_dict(scaling) if scaling else None,
            max_position_embeddings=_take(d, "max_position_embeddings", int, where),
            tie_word_embeddings=_take(d, "tie_word_embeddings", bool, where, False),
            bos_token_id=_take(d, "bos_token_id", optional_int, where, None),
            eos_token_id=_take(d, "eos_token_id", optional_int, where, None),
            pad_token_id=_take(d, "pad_token_id", optional_int, where, None),
        )
        cfg._check(where)
        return cfg

    def _check(self, where: str) -> None:
        """Ranges and the fit of the routing groups, past each field's type."""
        _at_least(self, where, 1, *_INT_FIELDS[TextConfig])
        _at_least(self, where, 0, "n_shared_experts", "first_k_dense_replace")
        _positive_float(self, where, "rms_norm_eps", "rope_theta")
        if self.qk_rope_head_dim % 2:
            raise CheckpointError(f"config.json: {where}.qk_rope_head_dim must be even (RoPE rotates pairs)")
        if self.max_position_embeddings > MAX_POSITIONS:
            raise CheckpointError(
                f"config.json: {where}.max_position_embeddings {self.max_position_embeddings} is implausibly large",
                f"at most {MAX_POSITIONS}",
            )
        per_group = self.n_routed_experts // self.n_group
        if (
            self.n_routed_experts % self.n_group
            or not 0 < self.topk_group <= self.n_group
            or (self.n_group > 1 and per_group < 2)  # a group scores by its best two experts
        ):
            raise CheckpointError(
                f"config.json: {where}.n_group {self.n_group} / topk_group {self.topk_group} do not fit "
                f"{self.n_routed_experts} experts"
            )
        if not 0 < self.num_experts_per_tok <= self.topk_group * per_group:
            raise CheckpointError(
                f"config.json: {where}.num_experts_per_tok {self.num_experts_per_tok} is out of range",
                f"at most the {self.topk_group * per_group} experts of the groups kept",
            )


def _check_architecture(d: dict[str, Any], where: str) -> None:
    """The text model is the DeepSeek-V3 kind this code runs: sigmoid routing, SiLU."""
    if d.get("model_type", "deepseek_v3") not in ("deepseek_v3", "deepseek_v2"):
        raise CheckpointError(
            f"config.json: unsupported {where}.model_type {d.get('model_type')!r}", "expected deepseek_v3"
        )
    if d.get("scoring_func", "sigmoid") != "sigmoid" or d.get("topk_method", "noaux_tc") != "noaux_tc":
        raise CheckpointError(
            f"config.json: routing {d.get('scoring_func')!r}/{d.get('topk_method')!r} is not supported",
            "Kimi-VL uses scoring_func 'sigmoid' with topk_method 'noaux_tc'",
        )
    if d.get("hidden_act", "silu") != "silu":
        raise CheckpointError(
            f"config.json: {where}.hidden_act {d.get('hidden_act')!r} is not supported", "expected silu"
        )


_INT_FIELDS: dict[type, tuple[str, ...]] = {
    VisionConfig: (
        "hidden_size",
        "num_hidden_layers",
        "num_attention_heads",
        "intermediate_size",
        "patch_size",
        "init_pos_emb_height",
        "init_pos_emb_width",
    ),
    TextConfig: (
        "vocab_size",
        "hidden_size",
        "intermediate_size",
        "moe_intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "q_lora_rank",
        "kv_lora_rank",
        "qk_nope_head_dim",
        "qk_rope_head_dim",
        "v_head_dim",
        "n_routed_experts",
        "n_group",
        "topk_group",
        "moe_layer_freq",
        "max_position_embeddings",
    ),
}
"""Sizes that must be at least 1 (None allowed where the field is optional, e.g. q_lora_rank)."""


@dataclass(frozen=True)
class KimiVLConfig:
    """The whole model: MoonViT tower, pixel-shuffle projector, DeepSeek-V3 language model."""

    vision: VisionConfig = field(default_factory=VisionConfig)
    text: TextConfig = field(default_factory=TextConfig)
    media_placeholder_token_id: int = 163605

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> KimiVLConfig:
        if not isinstance(d, dict):
            raise CheckpointError("config.json: top level is not a JSON object")
        if d.get("model_type") != "kimi_vl":
            raise CheckpointError(
                f"config.json: model_type is {d.get('model_type')!r}, not 'kimi_vl'",
                "point `model` at a Kimi-VL checkpoint",
            )
        vision = _take(d, "vision_config", dict, "config")
        text = _take(d, "text_config", dict, "config")
        return cls(
            vision=VisionConfig.from_dict(vision),
            text=TextConfig.from_dict(text),
            media_placeholder_token_id=_take(d, "media_placeholder_token_id", int, "config", 163605),
        )

    @classmethod
    def from_file(cls, path: str | Path) -> KimiVLConfig:
        return cls.from_dict(read_config(Path(path), "config.json"))

    def to_dict(self) -> dict[str, Any]:
        """The official layout (what `from_dict` reads), for the checkpoint generator."""
        vision = {f.name: getattr(self.vision, f.name) for f in fields(self.vision)}
        for internal in ("layer_norm_eps", "rope_theta", "rope_max_side"):
            vision.pop(internal)
        vision["merge_kernel_size"] = list(self.vision.merge_kernel_size)
        vision["model_type"] = "moonvit"
        text = {f.name: getattr(self.text, f.name) for f in fields(self.text)}
        scaling = self.text.rope_scaling
        text["rope_scaling"] = (
            None if scaling is None else {"type": "yarn", **{f.name: getattr(scaling, f.name) for f in fields(scaling)}}
        )
        text.update(
            model_type="deepseek_v3",
            topk_method="noaux_tc",
            scoring_func="sigmoid",
            hidden_act="silu",
            num_key_value_heads=self.text.num_attention_heads,
            attention_bias=False,
        )
        return {
            "architectures": ["KimiVLForConditionalGeneration"],
            "model_type": "kimi_vl",
            "media_placeholder_token_id": self.media_placeholder_token_id,
            "vision_config": vision,
            "text_config": text,
        }
