"""Traffic models of the fused decode kernels (kernels/gemv.py, moe_decode.py, mla_decode.py): the
bytes each launch reads from and writes to device memory, from its arguments and grid alone.

Counted once per launch: every weight row the launch uses (NF4 codes plus absmax, or dense
values), its activations in and out. Not counted: re-reads that hit L1/L2 (the x row every
program of a GEMV reads, the split partials every head's programs re-read). Routed experts are
counted as distinct (min(T*K, E) of them), an upper bound. Attention kernels read the cache up to
the token's position, which they read on the device: `slots` (the slots in use) stands in for
it, or the whole cache when unknown.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

Args = dict[str, Any]


def _size(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _row(codes: torch.Tensor, scales: torch.Tensor, nf4: bool) -> int:
    """Bytes of one weight row: its codes (or dense values) and, for NF4, its absmax."""
    return codes.shape[-1] * codes.element_size() + (scales.shape[-1] * scales.element_size() if nf4 else 0)


def _gemv(a: Args, grid: tuple[int, ...], slots: int | None) -> int:
    nf4, mode, n, n2 = a["NF4"], a["MODE"], a["N"], a["N2"]
    x, out = a["x_ptr"], a["out_ptr"]
    rows = n + (n2 if mode == 1 else n if mode == 2 else 0)  # stacked: N2 more rows; gated: N of each
    moved = rows * _row(a["w_ptr"], a["s_ptr"], nf4) + _size(x) + _size(out)
    if mode == 1:
        moved += _size(a["out2_ptr"])
    if a["RESIDUAL"]:
        moved += _size(a["res_ptr"])
    if a["NORM"]:
        moved += _size(a["norm_ptr"])
    return moved


def _experts(stack: torch.Tensor, scales: torch.Tensor, nf4: bool, used: int) -> int:
    """Bytes of `used` experts of an [E, N, .] stack."""
    return used * stack.shape[-2] * _row(stack, scales, nf4)


def _moe_route(a: Args, grid: tuple[int, ...], slots: int | None) -> int:
    return sum(_size(a[k]) for k in ("h_ptr", "norm_ptr", "router_ptr", "xn_ptr", "logits_ptr"))


def _moe_gate_up(a: Args, grid: tuple[int, ...], slots: int | None) -> int:
    nf4, k = a["NF4"], a["K"]
    tokens, n_slots = grid[2], grid[1]
    used = min(tokens * k, a["gate_ptr"].shape[0])
    moved = 2 * _experts(a["gate_ptr"], a["gate_s_ptr"], nf4, used)
    if n_slots > k:  # the shared MLP (its weights stand in for absent ones otherwise)
        moved += 2 * a["sgate_ptr"].shape[-2] * _row(a["sgate_ptr"], a["sgate_s_ptr"], nf4)
    moved += _size(a["x_ptr"]) + _size(a["act_ptr"]) + 2 * _size(a["idx_ptr"])
    if a["ROUTE"]:
        moved += _size(a["logits_ptr"]) + _size(a["bias_ptr"])
    return moved


def _moe_down(a: Args, grid: tuple[int, ...], slots: int | None) -> int:
    nf4, k = a["NF4"], a["K"]
    tokens = grid[1]
    moved = _experts(a["down_ptr"], a["down_s_ptr"], nf4, min(tokens * k, a["down_ptr"].shape[0]))
    if a["SLOTS"] > k:
        moved += a["sdown_ptr"].shape[-2] * _row(a["sdown_ptr"], a["sdown_s_ptr"], nf4)
    moved += _size(a["act_ptr"]) + _size(a["out_ptr"]) + _size(a["idx_ptr"]) + _size(a["w_ptr"])
    return moved + (_size(a["res_ptr"]) if a["RESIDUAL"] else 0)


def _mla_prep(a: Args, grid: tuple[int, ...], slots: int | None) -> int:
    w_uk = a["H"] * a["DN"] * _row(a["wkvb_ptr"], a["wkvb_s_ptr"], a["NF4"])
    cache_row = a["cache_ptr"].shape[-1] * a["cache_ptr"].element_size()
    inputs = sum(_size(a[k]) for k in ("q_ptr", "kv_ptr", "kv_norm_ptr", "inv_freq_ptr", "pos_ptr"))
    return w_uk + inputs + cache_row + _size(a["qabs_ptr"])


def _splits(a: Args, slots: int) -> int:
    return min(a["S_MAX"], -(-slots // a["MIN_KEYS"]))


def _partials(a: Args, slots: int) -> int:
    """Bytes of the split outputs in use: [H, R] sums plus a max and a sum per head."""
    return _splits(a, slots) * a["H"] * (a["R"] + 2) * 4


def _mla_attend(a: Args, grid: tuple[int, ...], slots: int | None) -> int:
    cache = a["cache_ptr"]
    slots = cache.shape[0] if slots is None else slots
    return slots * cache.shape[-1] * cache.element_size() + _size(a["qabs_ptr"]) + _partials(a, slots)


def _mla_out(a: Args, grid: tuple[int, ...], slots: int | None) -> int:
    slots = a["S_MAX"] * a["MIN_KEYS"] if slots is None else slots
    w_uv = a["H"] * a["DV"] * _row(a["wkvb_ptr"], a["wkvb_s_ptr"], a["NF4"])
    return _partials(a, slots) + w_uv + _size(a["out_ptr"])


DECODE_BYTES: dict[str, Callable[[Args, tuple[int, ...], int | None], int]] = {
    "_gemv_kernel": _gemv,
    "_moe_route_kernel": _moe_route,
    "_moe_gate_up_kernel": _moe_gate_up,
    "_moe_down_kernel": _moe_down,
    "_mla_prep_kernel": _mla_prep,
    "_mla_attend_kernel": _mla_attend,
    "_mla_out_kernel": _mla_out,
}
