"""The batch-1 decode step captured in CUDA graphs: one replay per token instead of thousands of launches.

The step (`Engine.decode_step` with positions as a device tensor) has static shapes and no
host-device sync for a given number of attended cache slots `kv_len`: attention runs over slots
[0, kv_len) masked by position, the MoE takes its sync-free kernels. So it is captured once per
(cache, kv_len), and each token costs two small copies into the graphs' input tensors plus one replay.

Two kinds of buckets keep the graphs few and the work proportional to the context in use:
- the cache: a power of two >= prompt + max_new_tokens (`cache_bucket`), so one set of graphs
  serves every request that fits it;
- the attended slots: the next of 256, 384, 512, 768, 1024, ... (powers of two and 1.5x them)
  over the position (`attention_bucket`), so a step reads at most 1.5x the slots in use, not the
  whole cache. Graphs are captured as decoding reaches each bucket (at most 17 for 64K slots) and
  share one memory pool (they never run at the same time).
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


def attention_bucket(slots: int, capacity: int) -> int:
    """Cache slots a decode step attends over when `slots` are in use: the next of MIN_BUCKET x
    {1, 1.5, 2, 3, 4, 6, ...} >= slots, at most `capacity`."""
    size = MIN_BUCKET
    while size < slots:
        size = size * 3 // 2 if size & (size - 1) == 0 else size * 4 // 3
    return min(size, capacity)


class DecodeGraph:
    """`step(tokens [1, 1], positions [1, 1], cache, kv_len)` captured over `cache`, one graph per
    `attention_bucket`.

    A call returns the replayed graph's own logits buffer, overwritten by its next replay: read (or
    clone) it before then. A capture runs the step three times at the cache's last slot, which is
    masked out for every earlier position and rewritten before any query can see it.

    `attends_by_position`: the step itself reads the position on the device and attends over the
    slots in use only (the fused decode kernels), whatever `kv_len`: one graph serves every position.
    """

    def __init__(self, step: DecodeStep, cache: LatentCache, attends_by_position: bool = False) -> None:
        if cache.buf.device.type != "cuda":
            raise ValueError("CUDA graphs need a CUDA cache")
        self.step = step
        self.cache = cache
        self.attends_by_position = attends_by_position
        self.in_use = False
        device = cache.buf.device
        self.tokens = torch.zeros(1, 1, dtype=torch.long, device=device)
        self.positions = torch.zeros(1, 1, dtype=torch.long, device=device)
        self.pool = torch.cuda.graph_pool_handle()
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}  # kv_len -> (graph, logits)

    def _capture(self, kv_len: int) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
        device = self.cache.buf.device
        self.positions.fill_(self.cache.capacity - 1)
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):  # warm-up off the capture: allocator pools, lazy weight splits, kernel builds
            for _ in range(2):
                self.step(self.tokens, self.positions, self.cache, kv_len)
        torch.cuda.current_stream(device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            logits = self.step(self.tokens, self.positions, self.cache, kv_len)
        return graph, logits

    def __call__(self, tokens: torch.Tensor, position: int) -> torch.Tensor:
        """tokens [1, 1] on the device, its position -> fp32 logits [1, V] (the graph's buffer)."""
        capacity = self.cache.capacity
        kv_len = capacity if self.attends_by_position else attention_bucket(position + 1, capacity)
        if kv_len not in self.graphs:
            self.graphs[kv_len] = self._capture(kv_len)
        graph, logits = self.graphs[kv_len]
        self.tokens.copy_(tokens)
        self.positions.fill_(position)
        graph.replay()
        return logits
