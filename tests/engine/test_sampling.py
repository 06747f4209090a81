"""Sampling: each filter against hand-computed numbers, the draw against its distribution,
properties over random logits, checkpoint defaults, and the absence of host-syncing ops."""

from __future__ import annotations

import json
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils._python_dispatch import TorchDispatchMode

from kimivl_cli.engine.sampling import (
    SamplingParams,
    apply_min_p,
    apply_repetition_penalty,
    apply_top_k,
    apply_top_p,
    filter_logits,
    is_thinking_model,
    make_generator,
    sample,
)
from kimivl_cli.errors import CheckpointError, InputError

NEG = -math.inf


def logits_of(probs: list[float]) -> torch.Tensor:
    return torch.tensor([probs]).log()


# --- filters, hand-computed ----------------------------------------------------------------------


def test_repetition_penalty_divides_positive_multiplies_negative_once() -> None:
    logits = torch.tensor([[2.0, -2.0, 1.0, 0.5]])
    prev = torch.tensor([[0, 1, 0, -1, -1]])  # token 0 twice, -1 is padding
    out = apply_repetition_penalty(logits, prev, 2.0)
    assert out.tolist() == [[1.0, -4.0, 1.0, 0.5]]


def test_repetition_penalty_is_per_row() -> None:
    logits = torch.tensor([[1.0, 1.0], [1.0, 1.0]])
    out = apply_repetition_penalty(logits, torch.tensor([[0], [1]]), 4.0)
    assert out.tolist() == [[0.25, 1.0], [1.0, 0.25]]


def test_top_k_keeps_k_largest_and_ties() -> None:
    logits = torch.tensor([[1.0, 5.0, 3.0, 4.0, 2.0]])
    assert apply_top_k(logits, 2).tolist() == [[NEG, 5.0, NEG, 4.0, NEG]]
    assert apply_top_k(logits, 99).tolist() == logits.tolist()
    tied = torch.tensor([[3.0, 1.0, 3.0, 2.0]])
    assert apply_top_k(tied, 1).tolist() == [[3.0, NEG, 3.0, NEG]]


def test_top_p_keeps_smallest_set_reaching_p() -> None:
    logits = logits_of([0.15, 0.5, 0.05, 0.3])
    # Sorted: 0.5, 0.3 (mass before 0.5 < 0.7: kept), 0.15 (mass before 0.8 >= 0.7: dropped).
    kept = apply_top_p(logits, 0.7).isfinite().tolist()
    assert kept == [[False, True, False, True]]
    assert apply_top_p(logits, 0.8).isfinite().tolist() == [[False, True, False, True]]
    assert apply_top_p(logits, 0.81).isfinite().tolist() == [[True, True, False, True]]
    assert apply_top_p(logits, 0.01).isfinite().tolist() == [[False, True, False, False]]  # at least one


def test_min_p_drops_below_fraction_of_top() -> None:
    logits = logits_of([0.5, 0.3, 0.15, 0.05])
    assert apply_min_p(logits, 0.2).isfinite().tolist() == [[True, True, True, False]]  # threshold 0.1
    assert apply_min_p(logits, 0.7).isfinite().tolist() == [[True, False, False, False]]  # threshold 0.35


def test_temperature_then_filters_in_transformers_order() -> None:
    logits = torch.tensor([[4.0, 2.0, 0.0, -2.0]])
    params = SamplingParams(temperature=2.0, top_k=3, min_p=0.5)
    # /2 -> [2, 1, 0, -1]; top-3 drops -1; softmax of [2,1,0]: 0.665, 0.245, 0.090 -> min-p 0.5 keeps only 2.
    out = filter_logits(logits, params)
    assert out.tolist() == [[2.0, NEG, NEG, NEG]]


def test_greedy_applies_penalty_then_argmax() -> None:
    logits = torch.tensor([[3.0, 2.0, 1.0], [0.0, 5.0, 1.0]])
    greedy = SamplingParams(temperature=0.0)
    assert sample(logits, greedy).tolist() == [0, 1]
    penalised = SamplingParams(temperature=0.0, repetition_penalty=2.0)
    assert sample(logits, penalised, prev_tokens=torch.tensor([[0], [-1]])).tolist() == [1, 1]


# --- the draw --------------------------------------------------------------------------------------

CHI2_DF3_P001 = 16.27  # chi-square critical value, 3 degrees of freedom, p = 0.001


def chi_square(ids: torch.Tensor, expected: list[float]) -> float:
    counts = torch.bincount(ids, minlength=len(expected)).double()
    exp = torch.tensor(expected, dtype=torch.float64) * len(ids)
    return float(((counts - exp) ** 2 / exp).sum())


@pytest.mark.parametrize(
    ("params", "expected"),
    [
        (SamplingParams(temperature=1.0), [0.1, 0.2, 0.3, 0.4]),
        # T = 0.5 squares the probabilities: 1, 4, 9, 16 over 30.
        (SamplingParams(temperature=0.5), [1 / 30, 4 / 30, 9 / 30, 16 / 30]),
    ],
)
def test_draw_follows_the_distribution(params: SamplingParams, expected: list[float]) -> None:
    n = 40_000
    logits = logits_of([0.1, 0.2, 0.3, 0.4]).expand(n, 4)
    ids = sample(logits, params, make_generator(1234, "cpu"))
    assert chi_square(ids, expected) < CHI2_DF3_P001


def test_draw_renormalises_over_the_kept_tokens() -> None:
    n = 40_000
    logits = logits_of([0.1, 0.2, 0.3, 0.4]).expand(n, 4)
    ids = sample(logits, SamplingParams(temperature=1.0, top_k=2), make_generator(7, "cpu"))
    assert set(ids.tolist()) == {2, 3}
    share_of_3 = (ids == 3).double().mean().item()
    assert abs(share_of_3 - 4 / 7) < 0.01  # 4 sigma is about 0.01 at n = 40000


def test_seed_makes_it_deterministic() -> None:
    logits = torch.randn(8, 1000, generator=torch.Generator().manual_seed(0))
    params = SamplingParams(temperature=1.0, top_p=0.9)

    def draws(seed: int) -> list[list[int]]:
        generator = make_generator(seed, "cpu")
        return [sample(logits, params, generator).tolist() for _ in range(4)]

    assert draws(5) == draws(5)
    assert draws(5) != draws(6)
    assert len({tuple(row) for row in draws(5)}) > 1  # the generator advances between steps
    assert make_generator(None, "cpu") is None


# --- properties -------------------------------------------------------------------------------------

finite = st.floats(-20, 20, allow_nan=False, width=32)


@settings(max_examples=150, deadline=None)
@given(
    rows=st.lists(st.lists(finite, min_size=6, max_size=6), min_size=1, max_size=4),
    temperature=st.floats(0.05, 3.0),
    top_k=st.integers(0, 8),
    top_p=st.floats(0.01, 1.0),
    min_p=st.floats(0.0, 1.0),
    seed=st.integers(0, 2**31),
)
def test_sampled_id_is_always_allowed(rows, temperature, top_k, top_p, min_p, seed) -> None:
    logits = torch.tensor(rows)
    params = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p)
    ids = sample(logits, params, make_generator(seed, "cpu"))
    scaled = logits / temperature  # float32 as in `sample`: values equal there are ties here too
    for row, i in zip(scaled, ids.tolist(), strict=True):
        if top_k:
            assert int((row > row[i]).sum()) < top_k, "outside the top-k"
        kept = row if not top_k else row.masked_fill(row < row.topk(min(top_k, 6)).values[-1], -math.inf)
        probs = kept.softmax(-1)
        assert float(probs[probs > probs[i]].double().sum()) < top_p + 1e-5, "outside the nucleus"
        assert float(probs[i]) >= min_p * float(probs.max()) * (1 - 1e-5), "below min-p"


@settings(max_examples=100, deadline=None)
@given(rows=st.lists(st.lists(finite, min_size=5, max_size=5), min_size=1, max_size=4), top_k=st.integers(0, 5))
def test_greedy_is_argmax(rows, top_k) -> None:
    logits = torch.tensor(rows)
    ids = sample(logits, SamplingParams(temperature=0.0, top_k=top_k, top_p=0.5))
    assert ids.tolist() == logits.argmax(-1).tolist()


# --- no host synchronisation ------------------------------------------------------------------------


class _SyncSpy(TorchDispatchMode):
    """Records ops that read tensor values on the host or have data-dependent shapes."""

    SYNCING = ("_local_scalar_dense", "nonzero", "masked_select", "unique", "multinomial", "index.Tensor")

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func.overloadpacket.__name__) + ("." + func._overloadname if func._overloadname else "")
        if any(s in name for s in self.SYNCING):
            self.seen.append(name)
        return func(*args, **(kwargs or {}))


def test_sample_has_no_host_syncing_ops() -> None:
    logits = torch.randn(2, 50)
    prev = torch.tensor([[1, 2, -1], [3, -1, -1]])
    params = SamplingParams(temperature=0.7, top_k=10, top_p=0.9, min_p=0.05, repetition_penalty=1.3)
    for p in (params, SamplingParams(temperature=0.0, repetition_penalty=1.3)):
        with _SyncSpy() as spy:
            sample(logits, p, make_generator(0, "cpu"), prev)
        assert spy.seen == []
    with _SyncSpy() as spy:  # the spy itself works
        logits.max().item()
    assert spy.seen


# --- settings and defaults --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "bad",
    [
        {"temperature": -1},
        {"temperature": math.nan},
        {"top_p": 0},
        {"top_p": 1.5},
        {"top_k": -1},
        {"min_p": 2},
        {"repetition_penalty": 0},
        {"max_new_tokens": 0},
        {"thinking_budget": -1},
    ],
)
def test_bad_settings_are_input_errors(bad) -> None:
    with pytest.raises(InputError, match=next(iter(bad))):
        SamplingParams(**bad)


def test_overrides_ignore_none() -> None:
    base = SamplingParams(temperature=0.8, top_p=0.95)
    assert base.with_overrides(temperature=None, top_p=0.5, seed=None) == SamplingParams(temperature=0.8, top_p=0.5)


def test_model_card_defaults_without_generation_config(tmp_path) -> None:
    thinking = SamplingParams.from_checkpoint(tmp_path, thinking=True, stop_token_ids=(7,))
    assert (thinking.temperature, thinking.max_new_tokens, thinking.stop_token_ids) == (0.8, 32768, (7,))
    instruct = SamplingParams.from_checkpoint(tmp_path, thinking=False)
    assert (instruct.temperature, instruct.max_new_tokens, instruct.top_p, instruct.top_k) == (0.2, 512, 1.0, 0)


def test_generation_config_overrides_the_card(tmp_path) -> None:
    config = {"temperature": 0.6, "top_p": 0.95, "top_k": 40, "max_new_tokens": 100, "eos_token_id": [9, 7]}
    (tmp_path / "generation_config.json").write_text(json.dumps(config))
    params = SamplingParams.from_checkpoint(tmp_path, thinking=True, stop_token_ids=(7, 8))
    assert (params.temperature, params.top_p, params.top_k, params.max_new_tokens) == (0.6, 0.95, 40, 100)
    assert params.stop_token_ids == (7, 8, 9)


def test_generation_config_do_sample_false_is_greedy(tmp_path) -> None:
    (tmp_path / "generation_config.json").write_text(json.dumps({"do_sample": False, "eos_token_id": 3}))
    params = SamplingParams.from_checkpoint(tmp_path, thinking=True)
    assert params.greedy and params.stop_token_ids == (3,)


@pytest.mark.parametrize(
    "content", ["{not json", "[1, 2]", '{"temperature": "hot"}', '{"top_p": 7}', '{"eos_token_id": "x"}']
)
def test_broken_generation_config_is_a_checkpoint_error(tmp_path, content) -> None:
    (tmp_path / "generation_config.json").write_text(content)
    with pytest.raises(CheckpointError, match=r"generation_config\.json"):
        SamplingParams.from_checkpoint(tmp_path, thinking=False)


def test_generated_checkpoint_defaults() -> None:
    from kimivl_cli.testing.checkpoint import cached_checkpoint

    folder = cached_checkpoint("tiny")
    eos = json.loads((folder / "generation_config.json").read_text())["eos_token_id"]
    params = SamplingParams.from_checkpoint(folder, thinking=False, stop_token_ids=(eos, 5))
    assert params == SamplingParams(temperature=0.2, max_new_tokens=512, stop_token_ids=(eos, 5))


def test_thinking_model_names() -> None:
    assert is_thinking_model("moonshotai/Kimi-VL-A3B-Thinking-2506")
    assert is_thinking_model("/models/kimi-vl-a3b-thinking/")
    assert not is_thinking_model("moonshotai/Kimi-VL-A3B-Instruct")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_sample_replays_in_a_cuda_graph() -> None:
    """Capture fails on any host synchronisation; replays must draw fresh, allowed tokens."""
    logits = torch.randn(4, 32000, device="cuda")
    prev = torch.randint(0, 32000, (4, 64), device="cuda")
    params = SamplingParams(temperature=0.8, top_k=40, top_p=0.9, min_p=0.02, repetition_penalty=1.1)
    graph = torch.cuda.CUDAGraph()
    generator = make_generator(0, "cuda")
    if hasattr(graph, "register_generator_state"):  # seeded generators in graphs: torch >= 2.5
        graph.register_generator_state(generator)
    else:
        generator = None  # the default generator is always graph-safe
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):
            sample(logits, params, generator, prev)  # warm-up outside the graph
    torch.cuda.current_stream().wait_stream(stream)
    with torch.cuda.graph(graph):
        ids = sample(logits, params, generator, prev)
    draws = []
    for _ in range(20):
        graph.replay()
        draws.append(ids.clone())
    draws = torch.stack(draws)  # [20, 4]
    allowed = filter_logits(logits, params, prev).isfinite()
    assert allowed.gather(1, draws.T).all()
    assert len({tuple(d.tolist()) for d in draws}) > 1, "the RNG must advance between replays"
