"""MoonViT, the vision tower of Kimi-VL (`vision_tower.*` in the official checkpoint).

Images of different sizes are packed into one sequence of 14x14 patches. Each image gets the learned
position table resized (bicubic) to its own grid, a 2D rotary embedding restarted at its own origin,
and attends only to itself: attention runs per image with SDPA, so no O(N²) block mask is ever built
(the reference's eager path adds that mask to the logits and leaks across images; this does not).

Legend: N patches of all images, P patches of one image, I images, D hidden, H heads, Dh head dim,
(h, w) an image's grid in patches, (kh, kw) the merge kernel, M = kh*kw.

Memory: the linear layers work on the packed [N, D] sequence. Attention costs, per image and head,
at most `ATTN_BLOCK_ELEMENTS` scores at a time (queries are processed in blocks when an image is
large), so the peak is O(H * min(P, block) * P) for the largest image P, not O(N²). Encoding many
images in bounded batches is the engine's job.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kimivl_cli.errors import InputError
from kimivl_cli.model.config import VisionConfig

# Attention scores materialised at once per image (heads x query block x keys): 2^26 fp32 = 256 MiB.
ATTN_BLOCK_ELEMENTS = 1 << 26


def grid_sizes(grid_hws: torch.Tensor, cfg: VisionConfig, n_patches: int) -> list[tuple[int, int]]:
    """Validate `grid_hws` [I, 2] against the config and the patch count; return [(h, w), ...]."""
    if grid_hws.ndim != 2 or grid_hws.shape[1] != 2:
        raise InputError(f"image_grid_hws should have shape [images, 2], got {list(grid_hws.shape)}")
    grids = [(int(h), int(w)) for h, w in grid_hws.tolist()]
    if not grids:
        raise InputError("image_grid_hws lists no images", "call the vision tower only when there are images")
    kh, kw = cfg.merge_kernel_size
    for h, w in grids:
        if h <= 0 or w <= 0 or h % kh or w % kw:
            raise InputError(f"image grid {h}x{w} is not a positive multiple of the {kh}x{kw} merge kernel")
        if max(h, w) >= cfg.rope_max_side:
            raise InputError(
                f"image grid {h}x{w} patches is beyond the vision position range ({cfg.rope_max_side} per side)",
                "downscale the image (a smaller token budget) or split it",
            )
    total = sum(h * w for h, w in grids)
    if total != n_patches:
        raise InputError(f"image_grid_hws covers {total} patches but pixel_values has {n_patches}")
    return grids


def rope_2d(h: int, w: int, head_dim: int, theta: float, device: torch.device | None = None) -> torch.Tensor:
    """Rotations for an h x w grid: complex [h*w, Dh/2], row-major over the grid, fp32 angles.

    Entry 2i rotates by column x * f_i, entry 2i+1 by row y * f_i, with f_i = theta^(-4i/Dh); so
    head dims (4i, 4i+1) turn with the column and (4i+2, 4i+3) with the row. Positions restart at
    (0, 0) for every image.
    """
    freqs = 1.0 / theta ** (torch.arange(0, head_dim, 4, device=device, dtype=torch.float32) / head_dim)
    y, x = torch.meshgrid(
        torch.arange(h, device=device, dtype=torch.float32),
        torch.arange(w, device=device, dtype=torch.float32),
        indexing="ij",
    )
    angles = torch.stack([torch.outer(x.flatten(), freqs), torch.outer(y.flatten(), freqs)], dim=-1)
    angles = angles.flatten(1)  # [P, Dh/2]: x f_0, y f_0, x f_1, y f_1, ...
    return torch.polar(torch.ones_like(angles), angles)


def apply_rope_2d(x: torch.Tensor, rot: torch.Tensor) -> torch.Tensor:
    """x [P, H, Dh] rotated pairwise (adjacent dims (2j, 2j+1) as one complex number) in fp32."""
    xc = torch.view_as_complex(x.float().unflatten(-1, (-1, 2)))  # [P, H, Dh/2]
    return torch.view_as_real(xc * rot[:, None, :]).flatten(-2).to(x.dtype)


class PositionTable(nn.Module):
    """The learned [h0, w0, D] absolute position table, resized to each image's grid."""

    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(cfg.init_pos_emb_height, cfg.init_pos_emb_width, cfg.hidden_size))

    def forward(self, grids: list[tuple[int, int]]) -> torch.Tensor:
        """-> [N, D]: bicubic (align_corners False, no antialias) per image, in the table's dtype.

        Interpolation always runs, even at the table's own size (where bicubic is the identity),
        as the reference does.
        """
        table = self.weight.permute(2, 0, 1).unsqueeze(0)  # [1, D, h0, w0]
        pieces = [
            F.interpolate(table, size=(h, w), mode="bicubic", align_corners=False)[0].flatten(1).T for h, w in grids
        ]
        return torch.cat(pieces)


class PatchEmbed(nn.Module):
    """Conv patch embedding (a Linear over each flattened 3x14x14 patch) plus the resized positions."""

    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        p = cfg.patch_size
        self.proj = nn.Conv2d(3, cfg.hidden_size, kernel_size=p, stride=p)
        self.pos_emb = PositionTable(cfg)

    def forward(self, pixel_values: torch.Tensor, grids: list[tuple[int, int]]) -> torch.Tensor:
        x = self.proj(pixel_values.to(self.proj.weight.dtype)).flatten(1)  # [N, D]
        return x + self.pos_emb(grids)


class MLP(nn.Module):
    def __init__(self, dim: int, inter: int) -> None:
        super().__init__()
        self.fc0 = nn.Linear(dim, inter)
        self.fc1 = nn.Linear(inter, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc1(F.gelu(self.fc0(x), approximate="tanh"))


class EncoderBlock(nn.Module):
    """Pre-norm ViT block with fused qkv: x + wo(attn(norm0 x)), then + fc1(gelu_tanh(fc0(norm1 x)))."""

    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        d = cfg.hidden_size
        self.heads, self.head_dim = cfg.num_attention_heads, cfg.head_dim
        self.norm0 = nn.LayerNorm(d, eps=cfg.layer_norm_eps)
        self.norm1 = nn.LayerNorm(d, eps=cfg.layer_norm_eps)
        self.wqkv = nn.Linear(d, 3 * d)
        self.wo = nn.Linear(d, d)
        self.mlp = MLP(d, cfg.intermediate_size)

    def forward(self, x: torch.Tensor, sizes: list[int], rots: list[torch.Tensor]) -> torch.Tensor:
        h = x + self.wo(self.attention(self.norm0(x), sizes, rots))
        return h + self.mlp(self.norm1(h))

    def attention(self, x: torch.Tensor, sizes: list[int], rots: list[torch.Tensor]) -> torch.Tensor:
        """Block-diagonal attention: x [N, D] split into images of `sizes` patches, each on its own."""
        q, k, v = self.wqkv(x).unflatten(-1, (3, self.heads, self.head_dim)).unbind(1)  # each [N, H, Dh]
        outs = [
            self._attend_image(apply_rope_2d(qi, rot), apply_rope_2d(ki, rot), vi)
            for qi, ki, vi, rot in zip(q.split(sizes), k.split(sizes), v.split(sizes), rots, strict=True)
        ]
        return torch.cat(outs).flatten(1)  # [N, D]

    def _attend_image(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Full (non-causal) attention within one image: [P, H, Dh] x3 -> [P, H, Dh], queries in blocks."""
        q, k, v = (t.transpose(0, 1) for t in (q, k, v))  # [H, P, Dh]
        n = q.shape[1]
        block = max(1, ATTN_BLOCK_ELEMENTS // (self.heads * n))
        out = torch.cat([F.scaled_dot_product_attention(q[:, s : s + block], k, v) for s in range(0, n, block)], 1)
        return out.transpose(0, 1)


class Encoder(nn.Module):
    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        self.config = cfg
        self.blocks = nn.ModuleList(EncoderBlock(cfg) for _ in range(cfg.num_hidden_layers))
        self.final_layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def forward(self, x: torch.Tensor, grids: list[tuple[int, int]]) -> torch.Tensor:
        cfg = self.config
        sizes = [h * w for h, w in grids]
        rots = [rope_2d(h, w, cfg.head_dim, cfg.rope_theta, x.device) for h, w in grids]  # shared by all blocks
        for block in self.blocks:
            x = block(x, sizes, rots)
        return self.final_layernorm(x)


def merge_patches(x: torch.Tensor, grids: list[tuple[int, int]], kernel: tuple[int, int]) -> list[torch.Tensor]:
    """[N, D] -> per image [h/kh * w/kw, M, D]: each kh x kw block of patches becomes one token,
    tokens row-major over the reduced grid, sub-patches ordered (dy, dx) row-major."""
    kh, kw = kernel
    out = []
    for xi, (h, w) in zip(x.split([h * w for h, w in grids]), grids, strict=True):
        xi = xi.view(h // kh, kh, w // kw, kw, -1).permute(0, 2, 1, 3, 4)
        out.append(xi.reshape((h // kh) * (w // kw), kh * kw, -1))
    return out


class MoonViT(nn.Module):
    """Patches of packed images -> per-image merged features [h/2 * w/2, 4, D] for the projector."""

    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        self.config = cfg
        self.patch_embed = PatchEmbed(cfg)
        self.encoder = Encoder(cfg)

    def forward(self, pixel_values: torch.Tensor, grid_hws: torch.Tensor) -> list[torch.Tensor]:
        """pixel_values [N, 3, p, p] (row-major patches of each image, images concatenated),
        grid_hws [I, 2] (h, w) -> list of I tensors [h/kh * w/kw, M, D]."""
        p = self.config.patch_size
        if pixel_values.ndim != 4 or tuple(pixel_values.shape[1:]) != (3, p, p):
            raise InputError(f"pixel_values should have shape [patches, 3, {p}, {p}], got {list(pixel_values.shape)}")
        grids = grid_sizes(grid_hws, self.config, pixel_values.shape[0])
        x = self.encoder(self.patch_embed(pixel_values, grids), grids)
        return merge_patches(x, grids, self.config.merge_kernel_size)
