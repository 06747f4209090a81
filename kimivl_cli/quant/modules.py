"""Quantized drop-in modules for the language model, filled one tensor at a time while loading.

- `NF4Linear` / `Int8Linear` replace `nn.Linear` (no bias in the LM).
- `NF4SwiGLU` replaces a whole SwiGLU MLP (dense layers, shared experts) in NF4 mode.
- `NF4Experts` replaces the stacked routed experts (`RoutedExperts`): same `forward(x, idx, w)`.
- Each runs its CPU kernels as built; on CUDA the loader swaps in (`placed`) the Triton twins
  `TritonNF4Linear` / `TritonNF4Experts`, and `NF4SwiGLU` drops its one-call CPU path.
- `quantize_linears_(model, mode)` swaps the modules of a model built on the meta device; each
  module's `load_tensor` is the loader's hook: it quantizes one checkpoint tensor on the target
  device and writes it into its slot, so the bf16 model never exists.

Which tensors are quantized: every language-model linear (attention
projections, dense MLP, shared and routed experts). Vision tower, projector, embeddings,
norms, router (`mlp.gate`) and `lm_head` stay in bf16.
"""

from __future__ import annotations

import re

import torch
from torch import nn

from kimivl_cli.kernels import cpu, native
from kimivl_cli.kernels.moe import MoEKernel
from kimivl_cli.kernels.moe_cpu import dequantize_cpu, moe_cpu, nf4_linear_cpu
from kimivl_cli.model.config import MLP_PROJECTIONS
from kimivl_cli.model.hooks import DevicePaths, KeepsDtype, OwnsCheckpointKeys, twin
from kimivl_cli.weight_formats import (
    BLOCKSIZE,
    Int8BlockTensor,
    NF4Tensor,
    dequantize_int8_blocks,
    dequantize_nf4,
    quantize_int8,
    quantize_int8_blocks,
    quantize_nf4,
)

# A quantized linear, by module path (any prefix): "...layers.<i>.<one of these>".
_QUANTIZED_MODULE = re.compile(
    r"(^|\.)layers\.\d+\.("
    r"self_attn\.(q_proj|q_a_proj|q_b_proj|kv_a_proj_with_mqa|kv_b_proj|o_proj)"
    rf"|mlp\.(shared_experts\.|experts\.\d+\.)?({'|'.join(MLP_PROJECTIONS)})"
    r")$"
)


class _QuantizedLinear(nn.Module, OwnsCheckpointKeys, KeepsDtype):
    """What NF4Linear and Int8Linear share: the loader hooks for the official `weight` [N, K] key,
    which the subclass quantizes in `load_weight`, and fp32 side buffers (absmax, scales)."""

    param_dtype = torch.float32  # model/weights.materialize: scales stay fp32 whatever the model dtype
    quantized = True  # model/weights: a pre-quantized checkpoint stores this module's buffers

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features

    def checkpoint_tensors(self) -> dict[str, torch.Size]:
        """Loader hook (model/weights.py): this module takes the official `weight` key itself."""
        return {"weight": torch.Size((self.out_features, self.in_features))}

    def load_tensor(self, name: str, tensor: torch.Tensor) -> None:
        self.load_weight(tensor)

    def load_weight(self, weight: torch.Tensor) -> None:
        raise NotImplementedError


class NF4Linear(_QuantizedLinear, DevicePaths):
    """y = x W^T with W in NF4 (4.5 bits/weight): packed [N, K/2] uint8, absmax [N, K/64] fp32, on CPU.

    y comes in x's dtype, or on CPU in `out_dtype` where set: the quantized `lm_head` keeps its logits fp32,
    as the bf16 head does (bf16 logits tie argmaxes)."""

    out_dtype: torch.dtype | None = None

    def __init__(self, in_features: int, out_features: int, device: torch.device | str | None = None) -> None:
        if in_features % BLOCKSIZE:
            raise ValueError(f"NF4Linear needs in_features divisible by {BLOCKSIZE}, got {in_features}")
        super().__init__(in_features, out_features)
        self.register_buffer("packed", torch.empty(out_features, in_features // 2, dtype=torch.uint8, device=device))
        self.register_buffer(
            "absmax", torch.empty(out_features, in_features // BLOCKSIZE, dtype=torch.float32, device=device)
        )

    @classmethod
    def from_weight(cls, weight: torch.Tensor, device: torch.device | str | None = None) -> NF4Linear:
        """Quantize `weight [N, K]` on `device` (default: where it is)."""
        module = cls(weight.shape[1], weight.shape[0], device or weight.device)
        module.load_weight(weight)
        return module

    @torch.no_grad()
    def load_weight(self, weight: torch.Tensor) -> None:
        q = quantize_nf4(weight.to(self.packed.device))
        self.packed.copy_(q.packed)
        self.absmax.copy_(q.absmax)

    def placed(self, device: torch.device) -> NF4Linear:
        return twin(self, TritonNF4Linear) if device.type == "cuda" else self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (
            nf4_linear_cpu(x.reshape(-1, self.in_features), self.packed, self.absmax)
            .to(self.out_dtype or x.dtype)
            .view(*x.shape[:-1], self.out_features)
        )

    @property
    def weight(self) -> torch.Tensor:
        """The dequantised weight [N, K] in fp32, for code that reads `.weight` (MLA's absorbed decode).

        Costs one dequantisation per access (N*K work, 4*N*K bytes): callers in a decode loop cache
        what they derive from it (MLAttention does).
        """
        return dequantize_cpu(self.packed, self.absmax)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, nf4"


class TritonNF4Linear(NF4Linear):
    """`NF4Linear` on CUDA: one Triton kernel reads the codes in place."""

    def placed(self, device: torch.device) -> NF4Linear:
        return self if device.type == "cuda" else twin(self, NF4Linear)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from kimivl_cli.kernels.moe_triton import nf4_matmul  # Triton only where there is a GPU

        return nf4_matmul(x, self.packed, self.absmax)

    @property
    def weight(self) -> torch.Tensor:
        return dequantize_nf4(NF4Tensor(self.packed, self.absmax, torch.float32))


class Int8Linear(_QuantizedLinear):
    """y = (x Q^T) * scale with Q int8 [N, K] and a per-row fp32 scale [N] (`--quant int8`)."""

    def __init__(self, in_features: int, out_features: int, device: torch.device | str | None = None) -> None:
        super().__init__(in_features, out_features)
        self.register_buffer("q", torch.empty(out_features, in_features, dtype=torch.int8, device=device))
        self.register_buffer("scale", torch.empty(out_features, dtype=torch.float32, device=device))

    @torch.no_grad()
    def load_weight(self, weight: torch.Tensor) -> None:
        t = quantize_int8(weight.to(self.q.device))
        self.q.copy_(t.q)
        self.scale.copy_(t.scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(x, self.q.to(x.dtype)) * self.scale.to(x.dtype)

    @property
    def weight(self) -> torch.Tensor:
        """The dequantised weight [N, K] in fp32 (one dequantisation per access, like NF4Linear's)."""
        return self.q.float() * self.scale[:, None]


class Int8BlockLinear(nn.Module):
    """y = x Wᵀ with W in int8 blocks (8.5 bits per weight: `weight_formats.quantize_int8_blocks`), fp32 out.

    The CPU's quantized `lm_head` (`quantize_lm_head_`): half the bytes of bf16 for the largest single
    matrix a decode step reads. Native int8 kernels on CPU (chosen when built, on the weight's device),
    else dequantised per call.
    """

    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        t = quantize_int8_blocks(weight)
        self.in_features, self.out_features = weight.shape[1], weight.shape[0]
        self.register_buffer("q", t.q)
        self.register_buffer("scale", t.scale)
        self.native = weight.device.type == "cpu" and native.available()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features)
        if self.native:
            out = native.int8_blocks_matmul(flat, self.q, self.scale)
        else:
            out = nn.functional.linear(flat.float(), dequantize_int8_blocks(Int8BlockTensor(self.q, self.scale)))
        return out.view(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 blocks of {BLOCKSIZE}"


LM_HEAD_MODES = ("bf16", "int8", "nf4")


@torch.no_grad()
def quantize_lm_head_(lm: nn.Module, mode: str) -> None:
    """Replace `lm.lm_head` by its quantized copy ("int8": `Int8BlockLinear`, "nf4": `NF4Linear`) and free the
    original; "bf16" (or tied embeddings, which the head cannot give up) keeps it. Accuracy against the
    bf16 head: benchmarks/lm_head_quant.py."""
    if mode not in LM_HEAD_MODES:
        raise ValueError(f"unknown lm_head mode {mode!r}: use one of {', '.join(LM_HEAD_MODES)}")
    if mode == "bf16" or lm.config.tie_word_embeddings:
        return
    weight = lm.lm_head.weight
    if mode == "int8":
        lm.lm_head = Int8BlockLinear(weight)
    else:
        lm.lm_head = NF4Linear.from_weight(weight).placed(weight.device)
        lm.lm_head.out_dtype = torch.float32


class NF4SwiGLU(nn.Module, DevicePaths):
    """down(silu(gate(x)) * up(x)) with NF4 projections: the dense MLP and the shared experts.

    On CPU (`fused_rows`), rows within the fused kernel's range (always one token: batch-1 decode) run
    as a single native call, the routed-expert kernel with one expert of weight 1: the activation is
    quantized once for gate and up and the three matrices stream in one threaded pass. Otherwise the
    three NF4Linear products, as in the bf16 model.
    """

    def __init__(self, dim: int, inter: int, device: torch.device | str | None = None) -> None:
        super().__init__()
        self.gate_proj = NF4Linear(dim, inter, device)
        self.up_proj = NF4Linear(dim, inter, device)
        self.down_proj = NF4Linear(inter, dim, device)
        self.fused_rows = True

    def placed(self, device: torch.device) -> NF4SwiGLU:
        self.fused_rows = device.type == "cpu"
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // x.shape[-1]
        if self.fused_rows and native.available() and rows <= cpu.plan().nf4_fused_max_rows:
            one_expert = [(m.packed[None], m.absmax[None]) for m in (self.gate_proj, self.up_proj, self.down_proj)]
            first, weight = torch.zeros(rows, 1, dtype=torch.int64), torch.ones(rows, 1)
            out = native.nf4_moe(x.reshape(rows, -1), first, weight, *one_expert)
            return out.to(x.dtype).view(x.shape)
        return self.down_proj(nn.functional.silu(self.gate_proj(x)) * self.up_proj(x))

    def extra_repr(self) -> str:
        return "nf4, one native call on CPU for few rows"


class NF4Experts(nn.Module, OwnsCheckpointKeys, KeepsDtype, DevicePaths):
    """Routed experts as stacked NF4: gate/up [E, I, H/2] + [E, I, H/64], down [E, H, I/2] + [E, H, I/64].

    `forward(x [T, H], idx [T, K], w [T, K]) -> [T, H]`: the active-experts path on CPU (`moe_cpu`);
    `TritonNF4Experts` on CUDA.
    """

    projections = MLP_PROJECTIONS
    param_dtype = torch.float32  # model/weights.materialize: absmax stays fp32 whatever the model dtype
    quantized = True  # model/weights: a pre-quantized checkpoint stores this module's buffers

    def __init__(self, n_experts: int, hidden: int, inter: int, device: torch.device | str | None = None) -> None:
        super().__init__()
        for name, n, k in (("gate_proj", inter, hidden), ("up_proj", inter, hidden), ("down_proj", hidden, inter)):
            if k % BLOCKSIZE:
                raise ValueError(f"NF4Experts needs {name} inner size divisible by {BLOCKSIZE}, got {k}")
            self.register_buffer(f"{name}_packed", torch.empty(n_experts, n, k // 2, dtype=torch.uint8, device=device))
            self.register_buffer(
                f"{name}_absmax", torch.empty(n_experts, n, k // BLOCKSIZE, dtype=torch.float32, device=device)
            )

    def checkpoint_tensors(self) -> dict[str, torch.Size]:
        """Loader hook: official per-expert suffixes ("7.up_proj.weight") and their bf16 shapes."""
        shapes = {p: torch.Size((getattr(self, f"{p}_packed").shape[1], getattr(self, f"{p}_packed").shape[2] * 2))
                  for p in self.projections}  # fmt: skip
        return {f"{e}.{p}.weight": shapes[p] for e in range(self.gate_proj_packed.shape[0]) for p in self.projections}

    def load_tensor(self, name: str, tensor: torch.Tensor) -> None:
        expert, proj, _ = name.split(".")
        self.load_expert(proj, int(expert), tensor)

    @torch.no_grad()
    def load_expert(self, proj: str, expert: int, weight: torch.Tensor) -> None:
        """Quantize one expert's `proj` ("gate_proj" | "up_proj" | "down_proj") weight into slot `expert`."""
        packed, absmax = getattr(self, f"{proj}_packed"), getattr(self, f"{proj}_absmax")
        q = quantize_nf4(weight.to(packed.device))
        packed[expert].copy_(q.packed)
        absmax[expert].copy_(q.absmax)

    def _weights(self, proj: str) -> tuple[torch.Tensor, torch.Tensor]:
        return getattr(self, f"{proj}_packed"), getattr(self, f"{proj}_absmax")

    def _stacks(self) -> tuple[tuple[torch.Tensor, torch.Tensor], ...]:
        return self._weights("gate_proj"), self._weights("up_proj"), self._weights("down_proj")

    def placed(self, device: torch.device) -> NF4Experts:
        return twin(self, TritonNF4Experts) if device.type == "cuda" else self

    def kernel(self) -> MoEKernel:
        return moe_cpu

    def forward(self, x: torch.Tensor, idx: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return self.kernel()(x, idx, w, *self._stacks())


class TritonNF4Experts(NF4Experts):
    """`NF4Experts` on CUDA: the Triton fused MoE (sync-free, CUDA-graph safe)."""

    def placed(self, device: torch.device) -> NF4Experts:
        return self if device.type == "cuda" else twin(self, NF4Experts)

    def kernel(self) -> MoEKernel:
        from kimivl_cli.kernels.moe_triton import fused_moe  # Triton only where there is a GPU

        return fused_moe


def quantize_linears_(model: nn.Module, mode: str, device: torch.device | str | None = None) -> nn.Module:
    """Swap the language model's linears (and stacked experts, for "nf4") for empty quantized modules.

    Call it on the language model (module paths "...layers.<i>.self_attn.q_proj" etc.).
    Meant for a model built on the meta device: the new buffers live on `device` and are
    filled by `load_quantized_`. Stacked experts are recognised by 3-D `gate_proj`/`up_proj`/
    `down_proj` parameters. mode: "nf4" | "int8" | "none".
    """
    if mode == "none":
        return model
    if mode == "nf4":
        for name, module in list(model.named_modules()):
            if _is_quantized_swiglu(name, module):
                parent_name, _, child = name.rpartition(".")
                parent = model.get_submodule(parent_name) if parent_name else model
                setattr(parent, child, NF4SwiGLU(module.gate_proj.in_features, module.gate_proj.out_features, device))
    for name, module in list(model.named_modules()):
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        if isinstance(module, nn.Linear) and _QUANTIZED_MODULE.search(name):
            cls = NF4Linear if mode == "nf4" else Int8Linear
            setattr(parent, child, cls(module.in_features, module.out_features, device))
        elif mode == "nf4" and _is_stacked_experts(module):
            n_experts, inter, hidden = module.gate_proj.shape
            setattr(parent, child, NF4Experts(n_experts, hidden, inter, device))
    return model


def _is_quantized_swiglu(name: str, module: nn.Module) -> bool:
    """A language-model MLP whose gate/up/down linears are all quantized (dense layers, shared experts)."""
    return all(
        isinstance(getattr(module, p, None), nn.Linear) and _QUANTIZED_MODULE.search(f"{name}.{p}")
        for p in MLP_PROJECTIONS
    )


def _is_stacked_experts(module: nn.Module) -> bool:
    projs = [getattr(module, p, None) for p in MLP_PROJECTIONS]
    return all(isinstance(p, torch.Tensor) and p.dim() == 3 for p in projs)
