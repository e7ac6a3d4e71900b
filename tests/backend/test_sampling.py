"""Next-token choice per row: greedy, seeded sampling, nucleus cut."""

from __future__ import annotations

import torch

from backend.generation import SamplingParams
from backend.sampling import make_generator, sample_next_tokens

LOGITS = torch.tensor([[0.0, 5.0, 1.0, 4.9], [3.0, 0.0, 0.0, 0.0]])


def test_temperature_zero_is_argmax() -> None:
    params = [SamplingParams(max_tokens=1, temperature=0.0)] * 2
    assert sample_next_tokens(LOGITS, params, [None, None]) == [1, 0]


def test_same_seed_same_tokens_different_rows_independent() -> None:
    params = SamplingParams(max_tokens=1, temperature=1.5, seed=7)
    flat = torch.zeros(1, 1000)

    def draw() -> list[int]:
        generator = make_generator(params)
        return [sample_next_tokens(flat, [params], [generator])[0] for _ in range(20)]

    first, second = draw(), draw()
    assert first == second
    assert len(set(first)) > 5  # really sampled, not argmax


def test_top_p_keeps_only_the_nucleus() -> None:
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    params = SamplingParams(max_tokens=1, temperature=1.0, top_p=0.7, seed=1)
    generator = make_generator(params)
    seen = {sample_next_tokens(logits, [params], [generator])[0] for _ in range(300)}
    assert seen == {0, 1}


def test_mixed_batch_greedy_and_sampled_rows() -> None:
    greedy = SamplingParams(max_tokens=1, temperature=0.0)
    sampled = SamplingParams(max_tokens=1, temperature=1.0, top_p=0.01, seed=3)
    tokens = sample_next_tokens(LOGITS, [sampled, greedy], [make_generator(sampled), None])
    assert tokens == [1, 0]  # top_p this small leaves only the most likely token
