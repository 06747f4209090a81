"""The MLA latent cache: what attention keeps per token, and attention over it.

MLA needs only two things from a past token: its normalised latent (`kv_lora_rank`) and its
rotated rope key (`qk_rope_head_dim`, shared by all heads). Per token and layer that is
512 + 64 = 576 values for the real model instead of 16 heads x (192 + 128) for an expanded
k/v cache: 8.9x smaller. The row `[latent | k_pe]` is also exactly the key of the absorbed
attention (see `language.MLAttention`), so decode attends straight over this buffer.

The buffer is preallocated once to the needed length and never grows: static shapes keep a
CUDA-graph-captured decode step valid.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kimivl_cli.errors import InputError
from kimivl_cli.model.config import TextConfig

# Bounds each block's score matrix (queries x keys x heads) to ~16M elements (64 MB in fp32),
# so attention over a long prompt never materialises an L x L matrix.
ATTN_BLOCK_ELEMENTS = 1 << 24


class LatentCache:
    """Per layer, batch row and position: `[latent (R) | rotated rope key (Dr)]`.

    Memory: layers x batch x max_len x (R + Dr) x dtype size, allocated here, apart from compute.
    The dtype must be the model's activation dtype (bf16 for bf16 weights, fp32 for the goldens).
    Slot p holds position p; slots not yet written are zeros and are masked out by position.
    """

    def __init__(
        self,
        cfg: TextConfig,
        batch: int,
        max_len: int,
        dtype: torch.dtype = torch.bfloat16,
        device: torch.device | str = "cpu",
    ) -> None:
        if not 0 < max_len <= cfg.max_position_embeddings:
            raise InputError(
                f"a context of {max_len} tokens does not fit this model",
                f"the model handles at most {cfg.max_position_embeddings} tokens",
            )
        self.kv_lora_rank = cfg.kv_lora_rank
        self.rope_dim = cfg.qk_rope_head_dim
        # L layers, B batch, S slots, W = R + Dr
        self.buf = torch.zeros(cfg.num_hidden_layers, batch, max_len, cfg.cache_width, dtype=dtype, device=device)

    @property
    def width(self) -> int:
        return self.buf.shape[-1]

    @property
    def capacity(self) -> int:
        return self.buf.shape[2]

    def update(self, layer: int, rows: torch.Tensor, positions: torch.Tensor | int, kv_len: int) -> torch.Tensor:
        """Write `rows` [B, T, W] at `positions` (start int, or [B, T] tensor) and return the
        keys [B, kv_len, W] attention should see (slots past a query's position get masked)."""
        buf = self.buf[layer]
        if isinstance(positions, int):
            buf[:, positions : positions + rows.shape[1]] = rows
        else:
            buf.scatter_(1, positions[..., None].expand_as(rows), rows)
        return buf[:, :kv_len]


def attend(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    q_pos: torch.Tensor,
    k_pos: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """Causal attention by position, in query blocks so scores stay O(block x L), never L x L.

    q [B, H, Tq, Dk], k [B, H, L, Dk], v [B, H, L, Dv], q_pos [B, Tq], k_pos [B or 1, L]
    -> [B, Hq, Tq, Dv]. A key is visible to a query iff its position is <= the query's.
    The block loop runs over shapes only (no host-device sync).
    """
    heads, n_q, n_k = q.shape[1], q.shape[2], k.shape[2]
    block = max(1, ATTN_BLOCK_ELEMENTS // (heads * n_k))
    outs = []
    for s in range(0, n_q, block):
        mask = k_pos[:, None, None, :] <= q_pos[:, None, s : s + block, None]  # [B, 1, tb, L]
        outs.append(F.scaled_dot_product_attention(q[:, :, s : s + block], k, v, attn_mask=mask, scale=scale))
    return outs[0] if len(outs) == 1 else torch.cat(outs, dim=2)


def attend_shared(
    q: torch.Tensor, keys: torch.Tensor, n_values: int, q_pos: torch.Tensor, k_pos: torch.Tensor, scale: float
) -> torch.Tensor:
    """Causal attention of many query rows over one shared key head whose values are the keys'
    first `n_values` dims (absorbed MLA: every head attends over the cache rows themselves).

    q [B, Tq, W], keys [B, L, W], q_pos [B, Tq], k_pos [B or 1, L] -> [B, Tq, n_values].
    Plain matmul-softmax-matmul in query blocks of O(block x L) scores: with one key head this beats
    SDPA on CPU (no head broadcast, no value copy; docs/performance.md) and has no host-device sync.
    """
    values = keys[..., :n_values]
    block = max(1, ATTN_BLOCK_ELEMENTS // keys.shape[1])
    outs = []
    for s in range(0, q.shape[1], block):
        scores = torch.bmm(q[:, s : s + block], keys.transpose(1, 2)).mul_(scale)  # [B, tb, L]
        scores.masked_fill_(k_pos[:, None, :] > q_pos[:, s : s + block, None], float("-inf"))
        outs.append(torch.bmm(scores.softmax(-1), values))
    return outs[0] if len(outs) == 1 else torch.cat(outs, dim=1)
