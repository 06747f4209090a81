"""The MoE layer of a decode step (a few tokens) in three launches: no sort, no `moe_sum` pass (Triton).

Shapes: T tokens (<= `MAX_TOKENS`), D hidden, E routed experts, K experts per token, I expert
intermediate, S shared slots (the shared MLP of width S*I, taken as S experts of width I that
every token selects with weight 1), SLOTS = K + S, G expert groups.

1. `moe_route`: RMSNorm of the hidden state (stored for step 2) and the router logits [T, E] in
   fp32; one program per (expert block, token), so the fp32 router streams from many SMs.
2. `moe_gate_up`: each program recomputes its token's routing from the logits (sigmoid, bias,
   group limit, top-K, renormalise, scale: a few hundred instructions, cheaper than a launch),
   takes its slot's expert and computes BN rows of silu(gate x) * up x -> act [T, SLOTS*I].
   Program (0, 0, t) also stores the token's expert ids and weights for step 3.
3. `moe_down`: each program owns BN output rows of one token and streams the down rows of its
   K experts as one inner dimension of K*I (each 64-block from its slot's expert, scaled by the
   slot's routing weight), then the shared MLP's S*I: the weighted sum over experts happens in
   the accumulator, plus an optional residual.

Experts no token selects cost nothing (programs exist per token and slot, never per expert).
With expert ids given (the module path, `NF4Experts`) step 1 is skipped and step 2 reads them.
Weights are NF4 or dense (`gemv.Weight`, stacked over experts); the tile code is `gemv`'s. The
routed and shared outputs add in one fp32 accumulator, where the module path rounds the routed
sum to x's dtype before adding the shared MLP: the two differ by at most an ulp or two.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from kimivl_cli.kernels.gemv import (
    Norm,
    Weight,
    codes,
    dense,
    dot_tile,
    gemv_tiles,
    input_tile,
    is_nf4,
    nf4_levels,
    pair_index,
    pairs,
    rms_norm_reference,
    rms_rstd,
    row_dots,
    row_sums,
    scales,
    strides,
    swiglu,
    tl_dtype,
    weight_pairs,
    weight_shape,
)
from kimivl_cli.kernels.reference import fused_moe_reference
from kimivl_cli.kernels.routing import DROPPED_GROUP_SCORE, RoutingConfig
from kimivl_cli.weight_formats import BLOCKSIZE

DROPPED_GROUP = tl.constexpr(DROPPED_GROUP_SCORE)  # a Triton kernel reads only constexpr globals
MAX_TOKENS = 16  # beyond this the grouped tensor-core kernel (moe_triton) is the faster path


@dataclass
class ExpertWeights:
    """Routed stacks gate/up [E, I, D], down [E, D, I], and the shared MLP gate/up [S*I, D],
    down [D, S*I] (None: S = 0); each NF4 or dense, all in the same format."""

    gate: Weight
    up: Weight
    down: Weight
    shared_gate: Weight | None = None
    shared_up: Weight | None = None
    shared_down: Weight | None = None

    @property
    def nf4(self) -> bool:
        return is_nf4(self.gate)

    @property
    def n_experts(self) -> int:
        return codes(self.gate).shape[0]

    @property
    def inter(self) -> int:
        return weight_shape(self.gate)[0]

    @property
    def hidden(self) -> int:
        return weight_shape(self.gate)[1]

    @property
    def shared_slots(self) -> int:
        return 0 if self.shared_gate is None else weight_shape(self.shared_gate)[0] // self.inter

    def shared(self, name: str) -> Weight:
        """A shared weight, or the routed one standing in as an unused pointer when S = 0."""
        w = getattr(self, f"shared_{name}")
        return getattr(self, name) if w is None else w


@triton.jit
def route_topk(
    logits_row, bias_ptr, scaling,
    K: tl.constexpr, G: tl.constexpr, EG: tl.constexpr, TOPK_GROUP: tl.constexpr, NORM_TOPK: tl.constexpr,
    G_PAD: tl.constexpr, EG_PAD: tl.constexpr, K_PAD: tl.constexpr,
):  # fmt: skip
    """`Router.forward` for one token from its fp32 logits -> (expert ids [K_PAD] int32, weights [K_PAD]).

    Experts sit in a [G_PAD, EG_PAD] tile (group, index in group); padding is -inf, dropped groups
    score `routing.DROPPED_GROUP_SCORE` as in `routing.route`. Ties pick the lowest expert id.
    """
    g = tl.arange(0, G_PAD)[:, None]
    j = tl.arange(0, EG_PAD)[None, :]
    flat = g * EG + j
    ok = (g < G) & (j < EG)
    scores = tl.sigmoid(tl.load(logits_row + flat, mask=ok, other=0.0))
    choice = tl.where(ok, scores + tl.load(bias_ptr + flat, mask=ok, other=0.0), float("-inf"))
    if G > 1:  # keep the TOPK_GROUP groups whose best two experts sum highest
        top = tl.max(choice, axis=1)
        first = tl.min(tl.where(choice == top[:, None], j, EG_PAD), axis=1)
        second = tl.max(tl.where(j == first[:, None], float("-inf"), choice), axis=1)
        groups = tl.arange(0, G_PAD)
        group_score = tl.where(groups < G, top + second, float("-inf"))
        keep = groups < 0
        for _ in tl.static_range(TOPK_GROUP):
            pick = tl.min(tl.where(group_score == tl.max(group_score, axis=0), groups, G_PAD), axis=0)
            keep = keep | (groups == pick)
            group_score = tl.where(groups == pick, float("-inf"), group_score)
        choice = tl.where(keep[:, None] | ~ok, choice, DROPPED_GROUP)
    slot = tl.arange(0, K_PAD)
    ids = tl.zeros([K_PAD], tl.int32)
    weights = tl.zeros([K_PAD], tl.float32)
    for k in tl.static_range(K):
        best = tl.max(tl.max(choice, axis=1), axis=0)
        pick = tl.min(tl.min(tl.where(choice == best, flat, G_PAD * EG), axis=1), axis=0)
        score = tl.sum(tl.sum(tl.where(flat == pick, scores, 0.0), axis=1), axis=0)
        ids = tl.where(slot == k, pick, ids)
        weights = tl.where(slot == k, score, weights)
        choice = tl.where(flat == pick, float("-inf"), choice)
    if K > 1 and NORM_TOPK:
        weights = weights / (tl.sum(weights, axis=0) + 1e-20)
    return ids, weights * scaling


@triton.jit
def _moe_route_kernel(
    h_ptr, norm_ptr, router_ptr, xn_ptr, logits_ptr,
    D, E, eps, stride_hm, stride_xm, stride_lm, stride_re,
    DT: tl.constexpr, BE: tl.constexpr, NB: tl.constexpr, NORM_BLOCK: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    t = tl.program_id(1).to(tl.int64)
    h_row = h_ptr + t * stride_hm
    rstd = rms_rstd(h_row, D, eps, DT, NORM_BLOCK)
    experts = pid * BE + tl.arange(0, BE)
    e_ok = experts < E
    experts = experts.to(tl.int64)
    n_blocks = D // 64
    acc = tl.zeros([BE, NB, 8, 4], tl.float32)
    for b0 in range(0, n_blocks, NB):
        blocks = b0 + tl.arange(0, NB)
        blk_ok = blocks < n_blocks
        x_even, x_odd = input_tile(h_row, norm_ptr, blocks, blk_ok, rstd, DT, True)
        if pid == 0:  # the normalised hidden state: the experts' input
            out = xn_ptr + t * stride_xm + pair_index(blocks) * 2
            tl.store(out, x_even.to(DT), mask=blk_ok[:, None, None])
            tl.store(out + 1, x_odd.to(DT), mask=blk_ok[:, None, None])
        mask = e_ok[:, None] & blk_ok[None, :]
        x_even, x_odd = x_even[None, :, :, :], x_odd[None, :, :, :]
        acc += dot_tile(
            router_ptr, router_ptr, 0.0, experts, blocks, mask, stride_re, 0, x_even, x_odd, False, tl.float32
        )
    tl.store(logits_ptr + t * stride_lm + experts, row_sums(acc, BE), mask=e_ok)


@triton.jit
def _moe_gate_up_kernel(
    x_ptr, act_ptr, gate_ptr, gate_s_ptr, up_ptr, up_s_ptr, sgate_ptr, sgate_s_ptr, sup_ptr, sup_s_ptr,
    logits_ptr, bias_ptr, idx_ptr, w_ptr,
    D, INTER, scaling,
    stride_xm, stride_am, stride_lm, stride_ge, stride_gse, stride_gn, stride_gsn, stride_sgn, stride_sgsn,
    DT: tl.constexpr, WDT: tl.constexpr, NF4: tl.constexpr, ROUTE: tl.constexpr,
    K: tl.constexpr, G: tl.constexpr, EG: tl.constexpr, TOPK_GROUP: tl.constexpr, NORM_TOPK: tl.constexpr,
    G_PAD: tl.constexpr, EG_PAD: tl.constexpr, K_PAD: tl.constexpr, BN: tl.constexpr, NB: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    s = tl.program_id(1)
    t = tl.program_id(2).to(tl.int64)
    if s < K:  # a routed slot: rows of expert e's stacks
        if ROUTE:
            ids, weights = route_topk(
                logits_ptr + t * stride_lm, bias_ptr, scaling, K, G, EG, TOPK_GROUP, NORM_TOPK, G_PAD, EG_PAD, K_PAD
            )
            if (pid == 0) & (s == 0):
                slots = tl.arange(0, K_PAD)
                tl.store(idx_ptr + t * K + slots, ids, mask=slots < K)
                tl.store(w_ptr + t * K + slots, weights, mask=slots < K)
            e = tl.sum(tl.where(tl.arange(0, K_PAD) == s, ids, 0), axis=0).to(tl.int64)
        else:
            e = tl.load(idx_ptr + t * K + s).to(tl.int64)
        g_ptr, g_s_ptr = gate_ptr + e * stride_ge, gate_s_ptr + e * stride_gse
        u_ptr, u_s_ptr = up_ptr + e * stride_ge, up_s_ptr + e * stride_gse
        row_stride, s_stride = stride_gn, stride_gsn
    else:  # a shared slot: rows (s - K) * INTER ... of the shared MLP
        first = (s - K).to(tl.int64) * INTER
        g_ptr, g_s_ptr = sgate_ptr + first * stride_sgn, sgate_s_ptr + first * stride_sgsn
        u_ptr, u_s_ptr = sup_ptr + first * stride_sgn, sup_s_ptr + first * stride_sgsn
        row_stride, s_stride = stride_sgn, stride_sgsn
    levels = nf4_levels() if NF4 else 0.0
    x_row = x_ptr + t * stride_xm
    rows = pid * BN + tl.arange(0, BN)
    row_ok = rows < INTER
    g, u = row_dots(
        x_row, x_row, 1.0, g_ptr, g_s_ptr, u_ptr, u_s_ptr, levels, rows.to(tl.int64), row_ok, D,
        row_stride, s_stride, row_stride, s_stride, DT, WDT, NF4, False, True, BN, NB,
    )  # fmt: skip
    tl.store(act_ptr + t * stride_am + s * INTER + rows, swiglu(g, u, DT).to(DT), mask=row_ok)


@triton.jit
def _moe_down_kernel(
    act_ptr, out_ptr, res_ptr, down_ptr, down_s_ptr, sdown_ptr, sdown_s_ptr, idx_ptr, w_ptr,
    D, INTER, stride_am, stride_om, stride_rm, stride_de, stride_dse, stride_dn, stride_dsn, stride_sdn, stride_sdsn,
    DT: tl.constexpr, WDT: tl.constexpr, NF4: tl.constexpr, RESIDUAL: tl.constexpr,
    K: tl.constexpr, SLOTS: tl.constexpr, BN: tl.constexpr, NB: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    t = tl.program_id(1).to(tl.int64)
    levels = nf4_levels() if NF4 else 0.0
    act_row = act_ptr + t * stride_am
    rows = pid * BN + tl.arange(0, BN)
    row_ok = rows < D
    rows = rows.to(tl.int64)
    slot_blocks = INTER // 64
    routed_blocks = K * slot_blocks
    within = pair_index(tl.zeros([1], tl.int32))  # [1, 8, 4]: pair offsets inside one block
    acc = tl.zeros([BN, NB, 8, 4], tl.float32)
    for b0 in range(0, routed_blocks, NB):  # the routed slots' blocks, in act's order
        blocks = b0 + tl.arange(0, NB)
        blk_ok = blocks < routed_blocks
        slot = blocks // slot_blocks
        expert = tl.load(idx_ptr + t * K + slot, mask=blk_ok, other=0).to(tl.int64)
        weight = tl.load(w_ptr + t * K + slot, mask=blk_ok, other=0.0)  # [NB]: each block's routing weight
        local = (blocks - slot * slot_blocks).to(tl.int64)  # the block within its expert's row
        mask = row_ok[:, None] & blk_ok[None, :]
        offs = (expert * stride_de + local * 32)[None, :] + rows[:, None] * stride_dn  # [BN, NB]
        words = tl.load(
            down_ptr + offs[:, :, None, None] + within[None], mask=mask[:, :, None, None], other=0,
            eviction_policy="evict_first",
        )  # fmt: skip
        w_even, w_odd = weight_pairs(words, levels, NF4, WDT)
        if NF4:
            s_offs = (expert * stride_dse + local)[None, :] + rows[:, None] * stride_dsn
            weight = tl.load(down_s_ptr + s_offs, mask=mask, other=0.0) * weight[None, :]
        else:
            weight = weight[None, :]
        x_even, x_odd = input_tile(act_row, act_row, blocks, blk_ok, 1.0, DT, False)
        acc += (w_even * x_even[None] + w_odd * x_odd[None]) * weight[:, :, None, None]
    shared_row = act_row + routed_blocks * 32  # the shared slots: one plain GEMV over S * I
    shared_blocks = (SLOTS - K) * slot_blocks
    for b0 in range(0, shared_blocks, NB):
        blocks = b0 + tl.arange(0, NB)
        blk_ok = blocks < shared_blocks
        x_even, x_odd = input_tile(shared_row, shared_row, blocks, blk_ok, 1.0, DT, False)
        mask = row_ok[:, None] & blk_ok[None, :]
        acc += dot_tile(
            sdown_ptr, sdown_s_ptr, levels, rows, blocks, mask, stride_sdn, stride_sdsn, x_even[None], x_odd[None],
            NF4, WDT,
        )  # fmt: skip
    y = row_sums(acc, BN).to(DT).to(tl.float32)
    if RESIDUAL:
        y += tl.load(res_ptr + t * stride_rm + rows, mask=row_ok, other=0.0).to(tl.float32)
    tl.store(out_ptr + t * stride_om + rows, y.to(DT), mask=row_ok)


def _check(x: torch.Tensor, experts: ExpertWeights) -> None:
    if x.shape[0] > MAX_TOKENS:
        raise ValueError(f"the decode MoE takes at most {MAX_TOKENS} tokens, got {x.shape[0]}")
    if x.shape[-1] != experts.hidden or experts.inter % BLOCKSIZE or experts.hidden % BLOCKSIZE:
        raise ValueError(f"expert sizes {experts.inter}/{experts.hidden} do not fit x [{x.shape[-1]}] in 64-blocks")


def moe_route(
    h: torch.Tensor, norm: Norm, router: torch.Tensor, tiles: tuple[int, int, int] | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """h [T, D] -> (rmsnorm(h) [T, D] in h's dtype, router logits [T, E] fp32); router [E, D] fp32."""
    t, d = h.shape
    n_experts = router.shape[0]
    xn = torch.empty_like(h)
    logits = torch.empty(t, n_experts, dtype=torch.float32, device=h.device)
    be, nb, warps = tiles or gemv_tiles(n_experts, d, h.device)
    warps = max(warps, 4 if h.is_cuda else 1)  # few programs (one per expert): more loads in flight each
    rp = pairs(router)
    _moe_route_kernel[(triton.cdiv(n_experts, be), t)](
        pairs(h), pairs(norm[0]), rp, xn, logits,
        d, n_experts, norm[1], pairs(h).stride(0), xn.stride(0), logits.stride(0), rp.stride(0),
        DT=tl_dtype(h.dtype), BE=be, NB=nb, NORM_BLOCK=min(512, triton.next_power_of_2(d // 2)), num_warps=warps,
    )  # fmt: skip
    return xn, logits


def moe_gate_up(
    x: torch.Tensor,
    experts: ExpertWeights,
    routing: RoutingConfig,
    logits: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    idx: torch.Tensor | None = None,
    tiles: tuple[int, int, int] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Step 2 -> (act [T, SLOTS*I], expert ids [T, K] int32, weights [T, K] fp32).

    Either logits [T, E] + bias [E] (the routing is computed here; ids and weights are returned),
    or idx [T, K] (ids given: the returned weights are left unwritten, the caller has its own).
    """
    _check(x, experts)
    t, k = x.shape[0], routing.top_k
    inter, slots = experts.inter, routing.top_k + experts.shared_slots
    route = logits is not None
    if route == (idx is not None):
        raise ValueError("moe_gate_up takes either logits and bias, or expert ids")
    act = torch.empty(t, slots * inter, dtype=x.dtype, device=x.device)
    ids = torch.empty(t, k, dtype=torch.int32, device=x.device) if route else idx.to(torch.int32).contiguous()
    weights = torch.empty(t, k, dtype=torch.float32, device=x.device)
    n_group = routing.n_group
    per_group = experts.n_experts // n_group
    bn, nb, warps = tiles or gemv_tiles(inter * slots * t, experts.hidden, x.device)
    xp = pairs(x)
    gate, up = experts.gate, experts.up
    sgate, sup = experts.shared("gate"), experts.shared("up")
    _moe_gate_up_kernel[(triton.cdiv(inter, bn), slots, t)](
        xp, act, codes(gate), scales(gate), codes(up), scales(up),
        codes(sgate), scales(sgate), codes(sup), scales(sup),
        logits if route else weights, bias if route else weights,
        ids, weights,
        experts.hidden, inter, routing.routed_scaling_factor,
        xp.stride(0), act.stride(0), logits.stride(0) if route else 0,
        *strides(gate, 0), *strides(gate), *strides(sgate),
        DT=tl_dtype(x.dtype), WDT=tl.uint8 if experts.nf4 else tl_dtype(gate.dtype), NF4=experts.nf4, ROUTE=route,
        K=k, G=n_group, EG=per_group, TOPK_GROUP=routing.topk_group, NORM_TOPK=routing.norm_topk_prob,
        G_PAD=triton.next_power_of_2(n_group), EG_PAD=triton.next_power_of_2(per_group),
        K_PAD=triton.next_power_of_2(k), BN=bn, NB=nb, num_warps=warps,
    )  # fmt: skip
    return act, ids, weights


def moe_down(
    act: torch.Tensor,
    experts: ExpertWeights,
    idx: torch.Tensor,
    weights: torch.Tensor,
    residual: torch.Tensor | None = None,
    tiles: tuple[int, int, int] | None = None,
) -> torch.Tensor:
    """Step 3: act [T, SLOTS*I], idx/weights [T, K] -> (residual +) sum over slots [T, D] in act's dtype."""
    t, k = idx.shape
    hidden, inter = experts.hidden, experts.inter
    out = torch.empty(t, hidden, dtype=act.dtype, device=act.device)
    bn, nb, warps = tiles or gemv_tiles(hidden * t, act.shape[1], act.device)
    ap = pairs(act)
    down, sdown = experts.down, experts.shared("down")
    res = out if residual is None else residual
    _moe_down_kernel[(triton.cdiv(hidden, bn), t)](
        ap, out, res, codes(down), scales(down), codes(sdown), scales(sdown),
        idx.to(torch.int32).contiguous(), weights.float().contiguous(),
        hidden, inter, ap.stride(0), out.stride(0), res.stride(0),
        *strides(down, 0), *strides(down), *strides(sdown),
        DT=tl_dtype(act.dtype), WDT=tl.uint8 if experts.nf4 else tl_dtype(down.dtype), NF4=experts.nf4,
        RESIDUAL=residual is not None, K=k, SLOTS=k + experts.shared_slots, BN=bn, NB=nb, num_warps=warps,
    )  # fmt: skip
    return out


def moe_decode(
    h: torch.Tensor,
    norm: Norm,
    router: torch.Tensor,
    bias: torch.Tensor,
    routing: RoutingConfig,
    experts: ExpertWeights,
) -> torch.Tensor:
    """A whole MoE block of a decode step in three launches: h + MoE(rmsnorm(h)), h [T, D]."""
    xn, logits = moe_route(h, norm, router)
    act, idx, weights = moe_gate_up(xn, experts, routing, logits=logits, bias=bias)
    return moe_down(act, experts, idx, weights, residual=h)


# --- PyTorch references -------------------------------------------------------------------------


def router_logits_reference(h: torch.Tensor, norm: Norm, router: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """What `moe_route` computes: (rmsnorm(h), rmsnorm(h) @ router^T in fp32)."""
    xn = rms_norm_reference(h, norm)
    return xn, F.linear(xn.float(), router.float())


def experts_reference(
    x: torch.Tensor, idx: torch.Tensor, weights: torch.Tensor, experts: ExpertWeights
) -> torch.Tensor:
    """Routed experts plus the shared MLP as the model computes them (fp32 sums, x's dtype out)."""
    y = fused_moe_reference(x, idx, weights, *(dense(w) for w in (experts.gate, experts.up, experts.down)))
    if experts.shared_gate is None:
        return y
    g = (x.float() @ dense(experts.shared_gate).t()).to(x.dtype)
    u = (x.float() @ dense(experts.shared_up).t()).to(x.dtype)
    act = (F.silu(g.float()).to(x.dtype).float() * u.float()).to(x.dtype)
    return (y.float() + (act.float() @ dense(experts.shared_down).t()).to(x.dtype).float()).to(x.dtype)
