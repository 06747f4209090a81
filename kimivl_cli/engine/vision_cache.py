"""Image features: encoded in memory-bounded chunks, and remembered by content.

A second question about the same image or PDF page should not pay for the vision tower again,
so projector outputs are kept in an LRU keyed by a hash of the exact model input (the patch
bytes and the grid). Keys never depend on file names: the same pixels from two paths share one
entry, and a re-rendered page at another resolution is a different entry.

Legend: N patches, I images, T image tokens (one per `<|media_pad|>`), E text hidden.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Callable

import torch

# Patches encoded per vision call. MoonViT's linear layers work on the packed [N, D] sequence and
# its attention on one image at a time, so peak activation memory grows with this budget (plus the
# largest single image, which is never split). 16K patches ~ 4 real-model 1792x1792 images.
DEFAULT_PATCH_BUDGET = 16384
DEFAULT_CACHE_BYTES = 512 << 20

# pixel_values [N, 3, p, p] + grid_hws [I, 2] -> per-image features, each [T_i, E]
Encoder = Callable[[torch.Tensor, torch.Tensor], list[torch.Tensor]]


def image_key(pixel_values: torch.Tensor, grid_hw: tuple[int, int]) -> str:
    """Content hash of one image's model input: its patches' bytes, dtype and grid."""
    h = hashlib.sha256(f"{grid_hw[0]}x{grid_hw[1]}:{pixel_values.dtype}:".encode())
    h.update(pixel_values.detach().contiguous().cpu().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


class FeatureCache:
    """LRU of image features by content key, bounded by total tensor bytes.

    An entry larger than the whole budget is not kept (it would only evict everything else).
    """

    def __init__(self, max_bytes: int = DEFAULT_CACHE_BYTES) -> None:
        self.max_bytes = max_bytes
        self.bytes = 0
        self._entries: OrderedDict[str, torch.Tensor] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: str) -> torch.Tensor | None:
        feats = self._entries.get(key)
        if feats is not None:
            self._entries.move_to_end(key)
        return feats

    def put(self, key: str, feats: torch.Tensor) -> None:
        size = feats.numel() * feats.element_size()
        if size > self.max_bytes:
            return
        if key in self._entries:
            self.bytes -= self._size(self._entries.pop(key))
        self._entries[key] = feats
        self.bytes += size
        while self.bytes > self.max_bytes:
            _, old = self._entries.popitem(last=False)
            self.bytes -= self._size(old)

    def clear(self) -> None:
        self._entries.clear()
        self.bytes = 0

    @staticmethod
    def _size(t: torch.Tensor) -> int:
        return t.numel() * t.element_size()


def encode_images(
    encoder: Encoder,
    pixel_values: torch.Tensor,
    grid_hws: torch.Tensor,
    cache: FeatureCache | None = None,
    patch_budget: int = DEFAULT_PATCH_BUDGET,
) -> tuple[list[torch.Tensor], int]:
    """Features [T_i, E] for each image, and how many images actually ran through the encoder.

    Cached images are skipped; the rest are packed into calls of at most `patch_budget` patches
    (an image larger than the budget runs alone). Hashing reads every pixel once: O(N) host work,
    small next to the encoder.
    """
    grids = [(int(h), int(w)) for h, w in grid_hws.tolist()]
    per_image = pixel_values.split([h * w for h, w in grids])
    keys = [image_key(pv, g) for pv, g in zip(per_image, grids, strict=True)]
    feats: list[torch.Tensor | None] = [cache.get(k) if cache is not None else None for k in keys]
    todo = [i for i, f in enumerate(feats) if f is None]
    encoded = 0
    while todo:
        batch, patches = [], 0
        while todo and (not batch or patches + per_image[todo[0]].shape[0] <= patch_budget):
            patches += per_image[todo[0]].shape[0]
            batch.append(todo.pop(0))
        outs = encoder(torch.cat([per_image[i] for i in batch]), grid_hws[batch])
        for i, out in zip(batch, outs, strict=True):
            feats[i] = out
            if cache is not None:
                cache.put(keys[i], out)
        encoded += len(batch)
    return [f for f in feats if f is not None], encoded
