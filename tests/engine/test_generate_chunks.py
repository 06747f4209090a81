"""Chunked prefill: the model never sees more than a chunk at once, and logits are one row."""

from __future__ import annotations

import torch

from kimivl_cli.engine.engine import Engine
from kimivl_cli.engine.sampling import SamplingParams


def test_prefill_runs_in_chunks_and_projects_only_the_last_position(tiny_engine: Engine, monkeypatch) -> None:
    lm = tiny_engine.lm
    seen_tokens: list[int] = []
    logits_rows: list[tuple[int, ...]] = []
    real_forward, real_logits = type(lm).forward, type(lm).logits

    def forward(self, embeds, *args, **kwargs):
        seen_tokens.append(embeds.shape[1])
        return real_forward(self, embeds, *args, **kwargs)

    def logits(self, hidden):
        logits_rows.append(tuple(hidden.shape[:-1]))
        return real_logits(self, hidden)

    monkeypatch.setattr(type(lm), "forward", forward)
    monkeypatch.setattr(type(lm), "logits", logits)
    engine = Engine(tiny_engine.model, tiny_engine.config, tiny_engine.tokenizer, prefill_chunk=16)
    prompt = torch.randint(0, 900, (100,), generator=torch.Generator().manual_seed(0))
    stream = engine.generate_ids(prompt, params=SamplingParams(temperature=0.0, max_new_tokens=3), stop_ids=())
    assert len(list(stream)) == 3
    decode = [] if engine._native_decode is not None else [1, 1]  # the native CPU step runs neither
    assert seen_tokens == [16] * 6 + [4] + decode  # prefill chunks, then two decode steps
    assert logits_rows == [(1,)] * (1 + len(decode))
    # Same tokens as a single-chunk prefill.
    whole = Engine(tiny_engine.model, tiny_engine.config, tiny_engine.tokenizer, prefill_chunk=4096)
    again = whole.generate_ids(prompt, params=SamplingParams(temperature=0.0, max_new_tokens=3), stop_ids=())
    assert list(again) == list(
        engine.generate_ids(prompt, params=SamplingParams(temperature=0.0, max_new_tokens=3), stop_ids=())
    )
