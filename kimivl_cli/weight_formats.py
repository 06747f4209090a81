"""NF4 and int8 weight formats, bit-compatible with bitsandbytes: a leaf (it imports only torch).

The format is what `kernels/` (which read it) and `quant/` (whose modules hold it) share; as a module
of its own below both, kernels never import `quant`, and `quant` imports kernels one way.

NF4 (QLoRA): each run of 64 consecutive weights (row-major) shares one fp32 `absmax`;
every weight becomes the index of the nearest of 16 normal-quantile values in
`[-1, 1]` after division by that absmax. Two indices share one byte, the first weight
of a pair in the high nibble — exactly bitsandbytes' `quantize_4bit(..., blocksize=64,
quant_type="nf4")` layout, so `packed.view(-1, 1)` is bnb's storage tensor.

Layout here keeps the weight's leading dims so kernels can index rows directly:
a `[..., N, K]` weight becomes `packed [..., N, K/2]` uint8 and `absmax [..., N, K/64]`
fp32 (4.5 bits per weight). K must be a multiple of 64 (true for every Kimi-VL linear).

int8 (`--quant int8`): symmetric per-output-row absmax scale, 8.03 bits per weight.

int8 blocks (the CPU's quantized `lm_head`): symmetric int8 with one fp32 scale per run of 64 weights
(8.5 bits per weight), each block stored as its 32 even-indexed weights then its 32 odd ones, the
order in which the native kernels hold a block's activations.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

BLOCKSIZE = 64

# The 16 NF4 levels (quantiles of N(0, 1) rescaled to [-1, 1], with an exact zero),
# as fp32 values identical to bitsandbytes' table.
NF4_LEVELS = (
    -1.0,
    -0.6961928009986877,
    -0.5250730514526367,
    -0.39491748809814453,
    -0.28444138169288635,
    -0.18477343022823334,
    -0.09105003625154495,
    0.0,
    0.07958029955625534,
    0.16093020141124725,
    0.24611230194568634,
    0.33791524171829224,
    0.44070982933044434,
    0.5626170039176941,
    0.7229568362236023,
    1.0,
)

# Rows quantized per step: bounds the fp32 temporaries to ~64 MB whatever the tensor size.
_CHUNK_ELEMENTS = 1 << 24


def nf4_code(device: torch.device | str | None = None) -> torch.Tensor:
    """The 16 NF4 levels as an fp32 tensor (index = 4-bit code)."""
    return torch.tensor(NF4_LEVELS, dtype=torch.float32, device=device)


@dataclass
class NF4Tensor:
    """A quantized `[..., N, K]` weight: `packed [..., N, K/2]` uint8, `absmax [..., N, K/64]` fp32."""

    packed: torch.Tensor
    absmax: torch.Tensor
    dtype: torch.dtype  # what `dequantize_nf4` returns by default (the source dtype)

    @property
    def shape(self) -> torch.Size:
        return torch.Size((*self.packed.shape[:-1], self.packed.shape[-1] * 2))

    @property
    def nbytes(self) -> int:
        return self.packed.nbytes + self.absmax.nbytes


@dataclass
class Int8Tensor:
    """A quantized `[..., N, K]` weight: `q` int8 of the same shape, `scale [..., N]` fp32."""

    q: torch.Tensor
    scale: torch.Tensor
    dtype: torch.dtype

    @property
    def shape(self) -> torch.Size:
        return self.q.shape

    @property
    def nbytes(self) -> int:
        return self.q.nbytes + self.scale.nbytes


def _check_k(shape: torch.Size) -> None:
    if len(shape) < 2 or shape[-1] % BLOCKSIZE:
        raise ValueError(f"NF4 needs a [..., N, K] weight with K a multiple of {BLOCKSIZE}, got {tuple(shape)}")


def _row_chunks(rows: int, k: int) -> range:
    return range(0, rows, max(1, _CHUNK_ELEMENTS // k))


def quantize_nf4(w: torch.Tensor) -> NF4Tensor:
    """Quantize on `w`'s own device, a chunk of rows at a time (peak extra memory ~64 MB).

    Rounding matches bitsandbytes: scale by the reciprocal absmax, clamp to [-1, 1], then
    pick the level whose midpoint interval contains the value (a tie goes to the lower level).
    """
    _check_k(w.shape)
    k = w.shape[-1]
    rows = w.reshape(-1, k)
    packed = torch.empty(rows.shape[0], k // 2, dtype=torch.uint8, device=w.device)
    absmax = torch.empty(rows.shape[0], k // BLOCKSIZE, dtype=torch.float32, device=w.device)
    levels = nf4_code(w.device)
    midpoints = (levels[:-1] + levels[1:]) / 2  # [15]
    for start in _row_chunks(rows.shape[0], k):
        blocks = rows[start : start + _CHUNK_ELEMENTS // k].float().view(-1, BLOCKSIZE)  # [B, 64]
        amax = blocks.abs().amax(dim=1)
        scaled = (blocks * (1.0 / amax.clamp(min=1e-38)).unsqueeze(1)).clamp(-1, 1)
        codes = torch.bucketize(scaled, midpoints).to(torch.uint8).view(-1, k // 2, 2)
        n = codes.shape[0]
        packed[start : start + n] = (codes[..., 0] << 4) | codes[..., 1]
        absmax[start : start + n] = amax.view(n, -1)
    lead = w.shape[:-1]
    return NF4Tensor(packed.view(*lead, k // 2), absmax.view(*lead, k // BLOCKSIZE), w.dtype)


def _byte_table(device: torch.device) -> torch.Tensor:
    """[256, 2] fp32: the two levels a packed byte stands for (high nibble first)."""
    levels = nf4_code(device)
    return torch.stack((levels.repeat_interleave(16), levels.repeat(16)), dim=-1)


def dequantize_nf4(t: NF4Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Full-precision weight `[..., N, K]`: level[code] * absmax, computed in fp32 like bitsandbytes.

    One table lookup per byte (a 256-row embedding) rather than per nibble (docs/performance.md).
    """
    values = torch.nn.functional.embedding(t.packed.int(), _byte_table(t.packed.device))  # [..., N, K/2, 2]
    values = values.view(*t.absmax.shape, BLOCKSIZE) * t.absmax.unsqueeze(-1)
    return values.flatten(-2).to(dtype or t.dtype)


def quantize_int8(w: torch.Tensor) -> Int8Tensor:
    """Symmetric per-row int8: q = round(w / s), s = absmax(row) / 127."""
    scale = w.float().abs().amax(dim=-1).clamp(min=1e-12) / 127.0
    q = torch.round(w.float() / scale.unsqueeze(-1)).clamp(-127, 127).to(torch.int8)
    return Int8Tensor(q, scale, w.dtype)


@dataclass
class Int8BlockTensor:
    """A `[N, K]` weight in int8 blocks: `q [N, K]` int8 (per 64-block: evens, then odds), `scale [N, K/64]` fp32."""

    q: torch.Tensor
    scale: torch.Tensor

    @property
    def nbytes(self) -> int:
        return self.q.nbytes + self.scale.nbytes


def quantize_int8_blocks(w: torch.Tensor) -> Int8BlockTensor:
    """q = round(w / s), s = absmax(block) / 127, one block of 64 weights at a time, chunked like `quantize_nf4`."""
    _check_k(w.shape)
    n, k = w.shape
    q = torch.empty(n, k, dtype=torch.int8, device=w.device)
    scale = torch.empty(n, k // BLOCKSIZE, dtype=torch.float32, device=w.device)
    for start in _row_chunks(n, k):
        blocks = w[start : start + _CHUNK_ELEMENTS // k].float().view(-1, BLOCKSIZE // 2, 2)  # [B, 32, (even, odd)]
        s = blocks.abs().amax(dim=(1, 2)) / 127
        codes = torch.round(blocks / s.clamp(min=1e-38)[:, None, None]).to(torch.int8)
        rows = codes.shape[0] * BLOCKSIZE // k
        q[start : start + rows] = codes.transpose(1, 2).reshape(rows, k)
        scale[start : start + rows] = s.view(rows, -1)
    return Int8BlockTensor(q, scale)


def dequantize_int8_blocks(t: Int8BlockTensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The weight `[N, K]` in natural order: q * scale per block, evens and odds interleaved back."""
    n, k = t.q.shape
    blocks = t.q.float().view(n, k // BLOCKSIZE, 2, BLOCKSIZE // 2) * t.scale[..., None, None]
    return blocks.transpose(2, 3).reshape(n, k).to(dtype)
