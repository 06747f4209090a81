"""The decode step is capturable: no host-device sync and static shapes, checked on CPU by tracing it
into one graph (fullgraph=True: a data-dependent Python branch fails) in which no value depends on
tensor data (.item()/.tolist()/nonzero/boolean masks/bincount all make unbacked symbols, i.e. a sync);
and the CUDA-graph path generates what the eager path does (on a GPU only)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch.fx.experimental.symbolic_shapes import free_unbacked_symbols

from kimivl_cli.engine.engine import Engine
from kimivl_cli.engine.graph import MIN_BUCKET, cache_bucket
from kimivl_cli.engine.sampling import SamplingParams
from kimivl_cli.model.cache import LatentCache
from kimivl_cli.testing.sync_free import with_gathered_experts


def data_dependent_nodes(found: list[str]):
    """A dynamo backend that runs the graph eagerly and records its data-dependent nodes in `found`."""

    def backend(gm: torch.fx.GraphModule, example_inputs: list) -> object:
        for node in gm.graph.nodes:
            value = node.meta.get("example_value")
            if value is not None and free_unbacked_symbols(value):
                found.append(f"{node.op} {node.target} ({node.stack_trace or ''})".strip())
        return gm.forward

    return backend


@torch.inference_mode()
def test_decode_step_compiles_as_one_graph_and_matches_eager(golden_models: dict, golden_dir: Path) -> None:
    model, config = golden_models["tiny-a"]
    engine = Engine(model, config)
    text_ids = load_file(str(golden_dir / "tiny-a" / "golden.safetensors"))["input_ids"]
    prompt = text_ids[text_ids != config.media_placeholder_token_id][None, :40]
    cache = LatentCache(config.text, 1, 64, torch.float32)
    logits = engine.prefill(prompt, None, cache)
    twin = LatentCache(config.text, 1, 64, torch.float32)
    twin.buf.copy_(cache.buf)
    syncs: list[str] = []
    torch._dynamo.reset()
    graphed = Engine(with_gathered_experts(model), config)  # the CPU experts group on the host: gather instead
    compiled = torch.compile(graphed.decode_step, fullgraph=True, backend=data_dependent_nodes(syncs), dynamic=False)
    for pos in range(prompt.shape[1], prompt.shape[1] + 4):
        token = logits.argmax(-1, keepdim=True)
        positions = torch.tensor([[pos]])
        logits = engine.decode_step(token, positions, cache, cache.capacity)  # CPU paths (one-token experts)
        static = compiled(token, positions, twin, twin.capacity)  # the sync-free paths a graph captures
        torch.testing.assert_close(static, logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(twin.buf, cache.buf, atol=1e-5, rtol=1e-5)
    assert syncs == []


@pytest.mark.parametrize(
    ("needed", "limit", "bucket"),
    [(1, 4096, MIN_BUCKET), (MIN_BUCKET, 4096, MIN_BUCKET), (MIN_BUCKET + 1, 4096, 2 * MIN_BUCKET), (3000, 4096, 4096)],
)
def test_cache_bucket_is_the_next_power_of_two_within_the_context(needed: int, limit: int, bucket: int) -> None:
    assert cache_bucket(needed, limit) == bucket
    assert cache_bucket(limit, limit) == limit


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device")
def test_cuda_graph_decode_equals_eager_decode_and_is_reused(tiny_checkpoint: Path) -> None:
    engine = Engine.load(tiny_checkpoint, dtype=torch.float32, device="cuda")
    prompt = list(range(30, 70))
    params = SamplingParams(temperature=0.0, max_new_tokens=24)

    def greedy() -> list[int]:
        return list(engine.generate_ids(prompt, params=params, stop_ids=()))

    engine.cuda_graphs = False
    eager = greedy()
    engine.cuda_graphs = True
    assert greedy() == eager
    graph = engine._graph
    assert graph is not None and not graph.in_use
    assert greedy() == eager
    assert engine._graph is graph  # same bucket: captured once


class _EagerGraph:
    """Stands in for DecodeGraph on CPU: the same protocol (cache, call, in_use), no capture."""

    def __init__(self, engine: Engine, capacity: int) -> None:
        self.engine, self.in_use, self.calls = engine, False, 0
        self.cache = LatentCache(engine.config.text, 1, capacity, engine.dtype, engine.device)

    def __call__(self, tokens: torch.Tensor, pos: int) -> torch.Tensor:
        self.calls += 1
        positions = torch.tensor([[pos]], device=tokens.device)
        return self.engine.decode_step(tokens, positions, self.cache, self.cache.capacity)


def test_a_held_graph_is_released_however_the_request_ends(tiny_checkpoint: Path, monkeypatch) -> None:
    engine = Engine.load(tiny_checkpoint, dtype=torch.float32, device="cpu")
    prompt, params = list(range(30, 70)), SamplingParams(temperature=0.0, max_new_tokens=12)
    eager = list(engine.generate_ids(prompt, params=params, stop_ids=()))
    graph = _EagerGraph(engine, 64)

    def hold(cache_len: int) -> _EagerGraph:
        graph.in_use = True
        return graph

    monkeypatch.setattr(engine, "_decode_graph", hold)
    assert list(engine.generate_ids(prompt, params=params, stop_ids=())) == eager  # to the end
    assert graph.calls == 11 and not graph.in_use
    stream = engine.generate_ids(prompt, params=params, stop_ids=())
    next(stream)
    stream.close()  # the caller stops reading (Ctrl-C, a closed pipe)
    assert not graph.in_use
    monkeypatch.setattr(engine, "prefill", lambda *a: (_ for _ in ()).throw(MemoryError("prefill")))
    with pytest.raises(MemoryError):
        list(engine.generate_ids(prompt, params=params, stop_ids=()))
    assert not graph.in_use
