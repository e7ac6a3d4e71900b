"""Next-token choice per row: greedy, seeded sampling, nucleus cut."""

from __future__ import annotations

import pytest
import torch

from backend.generation import SamplingParams
from backend.replica.sampler import make_generator, sample_next_tokens

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


def test_a_nucleus_wider_than_the_candidates_is_still_exact() -> None:
    # 1000 equally likely tokens: the 0.9 nucleus holds 900 of them, far more than the top few.
    params = SamplingParams(max_tokens=1, temperature=1.0, top_p=0.9, seed=5)
    generator = make_generator(params)
    flat = torch.zeros(1, 1000)
    seen = {sample_next_tokens(flat, [params], [generator])[0] for _ in range(400)}
    assert len(seen) > 200


def test_a_narrow_nucleus_in_a_large_vocabulary() -> None:
    logits = torch.full((1, 50_000), -20.0)
    logits[0, [7, 4242, 31337]] = torch.tensor([3.0, 2.5, 2.0])  # about 95% of the mass
    params = SamplingParams(max_tokens=1, temperature=1.0, top_p=0.8, seed=2)
    generator = make_generator(params)
    seen = {sample_next_tokens(logits, [params], [generator])[0] for _ in range(300)}
    assert seen == {7, 4242}  # the third token is past the 0.8 mass


def test_a_seeded_row_draws_the_same_whatever_shares_its_batch() -> None:
    seeded = SamplingParams(max_tokens=1, temperature=1.0, top_p=0.95, seed=11)
    others = [
        SamplingParams(max_tokens=1, temperature=0.8),
        SamplingParams(max_tokens=1, temperature=1.0, top_p=1.0),
        SamplingParams(max_tokens=1, temperature=0.0),
    ]
    logits = torch.randn(4, 3000, generator=torch.Generator().manual_seed(0)) * 3

    def draws(batched: bool) -> list[int]:
        generator = make_generator(seeded)
        if not batched:
            return [sample_next_tokens(logits[:1], [seeded], [generator])[0] for _ in range(30)]
        params, generators = [seeded, *others], [generator, None, None, None]
        return [sample_next_tokens(logits, params, generators)[0] for _ in range(30)]

    assert draws(batched=True) == draws(batched=False)


def test_unseeded_rows_are_drawn_in_one_call(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[int] = []
    rand = torch.rand

    def counting(*size: int, **kwargs: object) -> torch.Tensor:
        calls.append(size[0])
        return rand(*size, **kwargs)

    monkeypatch.setattr(torch, "rand", counting)
    params = [SamplingParams(max_tokens=1, temperature=0.7, top_p=p) for p in (0.9, 1.0)] * 3
    tokens = sample_next_tokens(torch.randn(6, 500), params, [None] * 6)
    assert len(tokens) == 6
    assert calls == [6]


@pytest.mark.parametrize("top_p", [1.0, 0.999])
def test_draws_follow_the_distribution(top_p: float) -> None:
    # Both paths (no cut, and a cut that keeps every token) must draw each token in proportion
    # to its probability; 20000 draws put each frequency within 0.012 (over 4 sigma).
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    params = SamplingParams(max_tokens=1, temperature=1.0, top_p=top_p, seed=3)
    generator = make_generator(params)
    logits = torch.log(probs).expand(20_000, -1)
    tokens = sample_next_tokens(logits, [params] * 20_000, [generator] * 20_000)
    frequencies = torch.bincount(torch.tensor(tokens), minlength=4) / 20_000
    assert torch.allclose(frequencies, probs, atol=0.012), frequencies


def test_a_zero_probability_token_is_never_drawn() -> None:
    logits = torch.tensor([[0.0, float("-inf"), 0.0, float("-inf")]]).expand(2000, -1)
    params = [SamplingParams(max_tokens=1, temperature=1.0)] * 2000
    assert set(sample_next_tokens(logits, params, [None] * 2000)) == {0, 2}
