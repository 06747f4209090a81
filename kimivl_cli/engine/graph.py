"""The batch-1 decode step captured in a CUDA graph: one replay per token instead of ~1,000 launches.

The step (`Engine.decode_step` with positions as a device tensor and `kv_len = cache.capacity`)
has static shapes and no host-device sync: attention runs over the whole preallocated cache,
masked by position, and the MoE takes its gathered path. So it is captured once per cache, and
each token costs two small copies into the graph's input tensors plus one replay.

Caches come in power-of-two length buckets so one graph serves every request that fits its
bucket; attending over the whole bucket costs at most 2x the needed keys.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from kimivl_cli.model.cache import LatentCache

MIN_BUCKET = 256
DecodeStep = Callable[[torch.Tensor, torch.Tensor, LatentCache, int], torch.Tensor]


def cache_bucket(needed: int, limit: int) -> int:
    """The cache length to capture for `needed` slots: the next power of two >= MIN_BUCKET, at most `limit`."""
    return min(limit, max(MIN_BUCKET, 1 << (needed - 1).bit_length()))


class DecodeGraph:
    """`step(tokens [1, 1], positions [1, 1], cache, cache.capacity)` captured over `cache`.

    `logits` is the graph's own output buffer, overwritten by every replay: read (or clone) it
    before the next one. Capture runs the step three times at the cache's last slot, which is
    masked out for every earlier position and rewritten before any query can see it.
    """

    def __init__(self, step: DecodeStep, cache: LatentCache) -> None:
        if cache.buf.device.type != "cuda":
            raise ValueError("CUDA graphs need a CUDA cache")
        self.cache = cache
        self.in_use = False
        device = cache.buf.device
        self.tokens = torch.zeros(1, 1, dtype=torch.long, device=device)
        self.positions = torch.full((1, 1), cache.capacity - 1, dtype=torch.long, device=device)
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):  # warm-up off the capture: allocator pools, lazy weight splits
            for _ in range(2):
                step(self.tokens, self.positions, cache, cache.capacity)
        torch.cuda.current_stream(device).wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.logits = step(self.tokens, self.positions, cache, cache.capacity)

    def __call__(self, tokens: torch.Tensor, position: int) -> torch.Tensor:
        """tokens [1, 1] on the device, its position -> fp32 logits [1, V] (the graph's buffer)."""
        self.tokens.copy_(tokens)
        self.positions.fill_(position)
        self.graph.replay()
        return self.logits
