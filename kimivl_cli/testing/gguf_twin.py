"""Our language model as llama.cpp's `deepseek2` GGUF, and llama.cpp run on it: the CPU benchmarks' anchor.

- `write_gguf(folder, out, "bf16" | "f32")`: a checkpoint's language model through the `gguf` package's
  writer, as llama.cpp's own converter lays it out (MLA's kv_b split into attn_k_b (transposed) and
  attn_v_b, experts stacked, the router and norms in f32), one tensor in memory at a time. Quantized
  types come from llama.cpp's own quantizer (`quantize`).
- `write_random_q4_k_m(cfg, out)`: a full-size model straight in Q4_K_M with random blocks (no 33 GB
  bf16 file first): each tensor gets the type llama.cpp's Q4_K_M recipe picks (`q4_k_m_type`, checked
  against the real quantizer's output on the mid checkpoint by benchmarks/cpu_vs_llamacpp.py).
- `LlamaCpp`: llama.cpp through `llama-cpp-python`'s C API: prompt ids in, greedy ids and logits out.

No vocabulary is written (`tokenizer.ggml.model` "no_vocab"): every run feeds token ids. `gguf` and
`llama_cpp` are benchmark dependencies, imported inside the functions.
"""

from __future__ import annotations

import ctypes
import functools
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open

from kimivl_cli.model.config import KimiVLConfig, TextConfig

LM = "language_model."


@dataclass(frozen=True)
class Spec:
    """One GGUF tensor: its name, numpy-order shape ([..., N, K]) and what fills it."""

    name: str
    shape: tuple[int, ...]
    source: tuple[str, ...]  # checkpoint keys (without "language_model."): one, or the stacked experts
    part: str = ""  # "k_b" | "v_b": which half of kv_b_proj


def layout(cfg: TextConfig) -> list[Spec]:
    """The GGUF tensors of `cfg`'s language model, in llama.cpp's converter's order and names."""
    import gguf

    names, T = gguf.TENSOR_NAMES, gguf.MODEL_TENSOR
    specs = [Spec(names[T.TOKEN_EMBD] + ".weight", (cfg.vocab_size, cfg.hidden_size), ("model.embed_tokens.weight",))]
    for i in range(cfg.num_hidden_layers):
        t = functools.partial(_layer_spec, names, i)
        specs += _attention_layout(cfg, T, t)
        specs += _moe_layout(cfg, T, t) if cfg.is_moe_layer(i) else _mlp_layout(cfg, T, t)
    return [
        *specs,
        Spec(names[T.OUTPUT_NORM] + ".weight", (cfg.hidden_size,), ("model.norm.weight",)),
        Spec(names[T.OUTPUT] + ".weight", (cfg.vocab_size, cfg.hidden_size), ("lm_head.weight",)),
    ]


def _layer_spec(names, i: int, kind, shape, *keys: str, suffix: str = ".weight", part: str = "") -> Spec:
    """Layer i's GGUF tensor of `kind`, read from the checkpoint keys `keys` (relative to the layer)."""
    return Spec(names[kind].format(bid=i) + suffix, shape, tuple(f"model.layers.{i}.{k}" for k in keys), part)


def _attention_layout(cfg: TextConfig, T, t) -> list[Spec]:
    D, H, R, Dr = cfg.hidden_size, cfg.num_attention_heads, cfg.kv_lora_rank, cfg.qk_rope_head_dim
    specs = [t(T.ATTN_NORM, (D,), "input_layernorm.weight")]
    if cfg.q_lora_rank is None:
        specs.append(t(T.ATTN_Q, (H * cfg.qk_head_dim, D), "self_attn.q_proj.weight"))
    else:
        specs += [
            t(T.ATTN_Q_A, (cfg.q_lora_rank, D), "self_attn.q_a_proj.weight"),
            t(T.ATTN_Q_A_NORM, (cfg.q_lora_rank,), "self_attn.q_a_layernorm.weight"),
            t(T.ATTN_Q_B, (H * cfg.qk_head_dim, cfg.q_lora_rank), "self_attn.q_b_proj.weight"),
        ]
    return [
        *specs,
        t(T.ATTN_KV_A_MQA, (R + Dr, D), "self_attn.kv_a_proj_with_mqa.weight"),
        t(T.ATTN_KV_A_NORM, (R,), "self_attn.kv_a_layernorm.weight"),
        t(T.ATTN_K_B, (H, R, cfg.qk_nope_head_dim), "self_attn.kv_b_proj.weight", part="k_b"),
        t(T.ATTN_V_B, (H, cfg.v_head_dim, R), "self_attn.kv_b_proj.weight", part="v_b"),
        t(T.ATTN_OUT, (D, H * cfg.v_head_dim), "self_attn.o_proj.weight"),
        t(T.FFN_NORM, (D,), "post_attention_layernorm.weight"),
    ]


def _mlp_layout(cfg: TextConfig, T, t) -> list[Spec]:
    D, F = cfg.hidden_size, cfg.intermediate_size
    return [
        t(T.FFN_GATE, (F, D), "mlp.gate_proj.weight"),
        t(T.FFN_UP, (F, D), "mlp.up_proj.weight"),
        t(T.FFN_DOWN, (D, F), "mlp.down_proj.weight"),
    ]


def _moe_layout(cfg: TextConfig, T, t) -> list[Spec]:
    D, E, Fe = cfg.hidden_size, cfg.n_routed_experts, cfg.moe_intermediate_size
    experts = [f"mlp.experts.{e}." for e in range(E)]
    specs = [
        t(T.FFN_GATE_INP, (E, D), "mlp.gate.weight"),
        t(T.FFN_EXP_PROBS_B, (E,), "mlp.gate.e_score_correction_bias", suffix=".bias"),
        t(T.FFN_GATE_EXP, (E, Fe, D), *(x + "gate_proj.weight" for x in experts)),
        t(T.FFN_UP_EXP, (E, Fe, D), *(x + "up_proj.weight" for x in experts)),
        t(T.FFN_DOWN_EXP, (E, D, Fe), *(x + "down_proj.weight" for x in experts)),
    ]
    if cfg.n_shared_experts:
        S = Fe * cfg.n_shared_experts
        specs += [
            t(T.FFN_GATE_SHEXP, (S, D), "mlp.shared_experts.gate_proj.weight"),
            t(T.FFN_UP_SHEXP, (S, D), "mlp.shared_experts.up_proj.weight"),
            t(T.FFN_DOWN_SHEXP, (D, S), "mlp.shared_experts.down_proj.weight"),
        ]
    return specs


def _keeps_f32(spec: Spec) -> bool:
    """Norms, biases and the router stay f32, as llama.cpp's converter and quantizer keep them."""
    return len(spec.shape) == 1 or "ffn_gate_inp" in spec.name


def _writer(out: Path, cfg: TextConfig, file_type: int) -> Any:
    """A GGUFWriter with the deepseek2 hyperparameters llama.cpp's converter writes for this config."""
    import gguf

    w = gguf.GGUFWriter(out, "deepseek2")
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(1)  # MLA runs as MQA over the latent
    w.add_rope_freq_base(cfg.rope_theta)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_expert_count(cfg.n_routed_experts)
    w.add_expert_used_count(cfg.num_experts_per_tok)
    w.add_expert_group_count(cfg.n_group)
    w.add_expert_group_used_count(cfg.topk_group)
    w.add_expert_gating_func(gguf.ExpertGatingFuncType.SIGMOID)
    w.add_leading_dense_block_count(cfg.first_k_dense_replace)
    w.add_vocab_size(cfg.vocab_size)
    w.add_q_lora_rank(cfg.q_lora_rank or 0)
    w.add_kv_lora_rank(cfg.kv_lora_rank)
    w.add_key_length(cfg.kv_lora_rank + cfg.qk_rope_head_dim)
    w.add_value_length(cfg.kv_lora_rank)
    w.add_key_length_mla(cfg.qk_head_dim)
    w.add_value_length_mla(cfg.v_head_dim)
    w.add_expert_feed_forward_length(cfg.moe_intermediate_size)
    w.add_expert_shared_count(cfg.n_shared_experts)
    w.add_expert_weights_scale(cfg.routed_scaling_factor)
    if cfg.norm_topk_prob:
        w.add_expert_weights_norm(True)
    w.add_rope_dimension_count(cfg.qk_rope_head_dim)
    if cfg.rope_scaling is not None:
        s = cfg.rope_scaling
        w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        w.add_rope_scaling_factor(s.factor)
        w.add_rope_scaling_orig_ctx_len(s.original_max_position_embeddings)
        w.add_rope_scaling_yarn_log_mul(0.1 * s.mscale_all_dim)
    w.add_tokenizer_model("no_vocab")
    w.add_file_type(file_type)
    return w


def _tensor(f: Any, spec: Spec, cfg: TextConfig) -> torch.Tensor:
    """The spec's data from an open checkpoint, in the checkpoint's dtype."""
    if len(spec.source) > 1:
        return torch.stack([f.get_tensor(LM + key) for key in spec.source])
    t = f.get_tensor(LM + spec.source[0])
    if spec.part:
        H, Dn, Dv = cfg.num_attention_heads, cfg.qk_nope_head_dim, cfg.v_head_dim
        k_b, v_b = t.view(H, Dn + Dv, -1).split([Dn, Dv], dim=1)
        t = k_b.transpose(1, 2) if spec.part == "k_b" else v_b
    return t.contiguous()


def write_gguf(folder: Path, out: Path, dtype: str) -> None:
    """The checkpoint in `folder` (one safetensors file) as a deepseek2 GGUF in "bf16" or "f32"."""
    import gguf

    cfg = KimiVLConfig.from_file(folder / "config.json").text
    file_type = gguf.LlamaFileType.MOSTLY_BF16 if dtype == "bf16" else gguf.LlamaFileType.ALL_F32
    w = _writer(out, cfg, file_type)
    specs = layout(cfg)
    for spec in specs:
        f32 = dtype == "f32" or _keeps_f32(spec)
        n = int(np.prod(spec.shape))
        w.add_tensor_info(
            spec.name, spec.shape, np.dtype(np.float32 if f32 else np.uint16), n * (4 if f32 else 2),
            None if f32 else gguf.GGMLQuantizationType.BF16,
        )  # fmt: skip
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    with safe_open(folder / "model.safetensors", "pt") as f:
        for spec in specs:
            t = _tensor(f, spec, cfg)
            if dtype == "f32" or _keeps_f32(spec):
                w.write_tensor_data(t.float().numpy())
            else:
                w.write_tensor_data(t.to(torch.bfloat16).view(torch.uint16).numpy())
    w.close()


# ---------------------------------------------------------------- llama.cpp's Q4_K_M recipe, written directly


def _use_more_bits(layer: int, layers: int) -> bool:
    return layer < layers // 8 or layer >= 7 * layers // 8 or (layer - layers // 8) % 3 == 2


_FALLBACK = {"Q4_K": "Q5_0", "Q6_K": "Q8_0"}  # when a row is not a whole number of 256-blocks


def q4_k_m_type(spec: Spec, layers: int) -> str:
    """The type llama.cpp's quantizer gives `spec` for Q4_K_M (its llama-quant.cpp rules for this model):
    Q6_K for the output and for ffn_down* in the "more bits" layers, Q4_K elsewhere, a 32-block type
    where rows are not whole 256-blocks, f32 kept for norms, biases and the router."""
    if _keeps_f32(spec):
        return "F32"
    kind = "Q4_K"
    if spec.name.startswith("output.") or (
        "ffn_down" in spec.name and _use_more_bits(int(spec.name.split(".")[1]), layers)
    ):
        kind = "Q6_K"
    return kind if spec.shape[-1] % 256 == 0 else _FALLBACK[kind]


def _random_blocks(kind: str, rows: int, k: int, gen: np.random.Generator) -> np.ndarray:
    """rows x (k weights) of random `kind` blocks, scales set so the weights are ~N(0, 1/k)-sized."""
    import gguf

    qtype = gguf.GGMLQuantizationType[kind]
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    data = gen.integers(0, 256, size=(rows, k // block, size), dtype=np.uint8)
    scale = np.frombuffer(
        np.float16(1 / (64 * np.sqrt(k))).tobytes(), np.uint8
    )  # a block scale keeping |w| ~ 1/sqrt(k)
    if kind == "Q4_K":  # d, dmin (fp16) then 12 bytes of 6-bit scales / mins
        data[..., 0:2], data[..., 2:4] = scale, scale
    elif kind == "Q6_K":  # ql[128], qh[64], scales[16] (int8), d (fp16) last
        data[..., 192:208] = gen.integers(1, 32, size=(rows, k // block, 16), dtype=np.uint8)
        data[..., 208:210] = scale
    else:  # Q5_0 / Q8_0: d (fp16) first
        data[..., 0:2] = scale
    return data.reshape(rows, -1)


def write_random_q4_k_m(cfg: TextConfig, out: Path, seed: int = 0) -> dict[str, int]:
    """A Q4_K_M GGUF of `cfg` with random blocks (f32 tensors: norms 1, router and bias random), written
    one tensor at a time (peak memory: about the largest tensor). Returns the count of tensors per type."""
    import gguf

    gen = np.random.default_rng(seed)
    w = _writer(out, cfg, gguf.LlamaFileType.MOSTLY_Q4_K_M)
    specs = layout(cfg)
    kinds = [q4_k_m_type(s, cfg.num_hidden_layers) for s in specs]
    for spec, kind in zip(specs, kinds, strict=True):
        n = int(np.prod(spec.shape))
        if kind == "F32":
            w.add_tensor_info(spec.name, spec.shape, np.dtype(np.float32), n * 4)
            continue
        qtype = gguf.GGMLQuantizationType[kind]
        block, size = gguf.GGML_QUANT_SIZES[qtype]
        byte_shape = (*spec.shape[:-1], spec.shape[-1] // block * size)
        w.add_tensor_info(spec.name, byte_shape, np.dtype(np.uint8), n // block * size, qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    for spec, kind in zip(specs, kinds, strict=True):
        k = spec.shape[-1]
        rows = int(np.prod(spec.shape[:-1]))
        if kind == "F32":
            data = (
                np.ones(spec.shape, np.float32) if "norm" in spec.name else gen.standard_normal(spec.shape, np.float32)
            )
            w.write_tensor_data((data * (1.0 if "norm" in spec.name else 1 / np.sqrt(k))).astype(np.float32))
        else:  # the largest (the output head) is ~0.3 GB
            w.write_tensor_data(_random_blocks(kind, rows, k, gen))
    w.close()
    return {kind: kinds.count(kind) for kind in sorted(set(kinds))}


def quantize(src: Path, out: Path, ftype: str, threads: int) -> None:
    """llama.cpp's own quantizer: `src` (bf16/f32 GGUF) -> `out` as "Q4_K_M" | "Q4_0" | "Q8_0"."""
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{ftype}")
    params.nthread = threads
    if llama_cpp.llama_model_quantize(str(src).encode(), str(out).encode(), ctypes.byref(params)) != 0:
        raise RuntimeError(f"llama.cpp could not quantize {src} to {ftype}")


def tensor_types(path: Path) -> dict[str, str]:
    """The type of each tensor in a GGUF file."""
    import gguf

    return {t.name: t.tensor_type.name for t in gguf.GGUFReader(path).tensors}


# ---------------------------------------------------------------- running llama.cpp


class LlamaCpp:
    """A GGUF model in llama.cpp (its C API through llama-cpp-python), `threads` threads for both phases.

    `repack=False` turns off llama.cpp's extra weight layouts (its `--no-repack`): the AMX one aborts on
    quantized deepseek2 models (`GGML_ASSERT(*cur_backend_id != -1)`). `mmap=False` reads the weights
    into memory at load (as kimivl holds them), so no page fault lands inside a timed run.
    """

    def __init__(
        self, path: Path, threads: int, context: int, batch: int, repack: bool = False, mmap: bool = False
    ) -> None:
        import llama_cpp

        self.lib = llama_cpp
        self._quiet = llama_cpp.llama_log_callback(lambda level, text, data: None)  # kept: C holds the pointer
        llama_cpp.llama_log_set(self._quiet, None)
        llama_cpp.llama_backend_init()
        mparams = llama_cpp.llama_model_default_params()
        mparams.use_extra_bufts, mparams.use_mmap = repack, mmap
        self.model = llama_cpp.llama_model_load_from_file(str(path).encode(), mparams)
        if not self.model:
            raise RuntimeError(f"llama.cpp could not load {path}")
        cparams = llama_cpp.llama_context_default_params()
        cparams.n_ctx, cparams.n_batch, cparams.n_ubatch = context, batch, min(batch, 512)
        cparams.n_threads = cparams.n_threads_batch = threads
        self.ctx = llama_cpp.llama_init_from_model(self.model, cparams)
        if not self.ctx:
            raise RuntimeError("llama.cpp could not create a context")
        self.n_vocab = llama_cpp.llama_vocab_n_tokens(llama_cpp.llama_model_get_vocab(self.model))

    def close(self) -> None:
        self.lib.llama_free(self.ctx)
        self.lib.llama_model_free(self.model)

    def _decode(self, ids: list[int]) -> np.ndarray:
        tokens = (self.lib.llama_token * len(ids))(*ids)
        if self.lib.llama_decode(self.ctx, self.lib.llama_batch_get_one(tokens, len(ids))) != 0:
            raise RuntimeError("llama_decode failed")
        return np.ctypeslib.as_array(self.lib.llama_get_logits_ith(self.ctx, -1), shape=(self.n_vocab,))

    def generate(
        self, prompt: list[int], new: int, one_by_one: bool = False
    ) -> tuple[list[int], np.ndarray, float, float]:
        """Greedy: -> generated ids, the prompt's last logits (a copy), prefill seconds (to the first
        logits), decode seconds (`new` tokens: new - 1 forward passes and the argmaxes).
        `one_by_one` feeds the prompt a token at a time: llama.cpp's decode path, for checking."""
        self.lib.llama_memory_clear(self.lib.llama_get_memory(self.ctx), True)
        t0 = time.perf_counter()
        for token in prompt[:-1] if one_by_one else []:
            self._decode([token])
        logits = self._decode(prompt[-1:] if one_by_one else prompt)
        first = logits.copy()
        t1 = time.perf_counter()
        ids = []
        for i in range(new):
            ids.append(int(logits.argmax()))
            if i < new - 1:
                logits = self._decode(ids[-1:])
        return ids, first, t1 - t0, time.perf_counter() - t1

    def system_info(self) -> str:
        return self.lib.llama_print_system_info().decode()
