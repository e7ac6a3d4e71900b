"""Logits processors: bias, penalties and cuts change only what they should, on one row."""

from __future__ import annotations

import math

import torch

from backend.generation import SamplingParams
from backend.replica.processors import adjust, adjusts

PLAIN = SamplingParams(max_tokens=1)


def row(*values: float) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32)


def adjusted(
    logits: torch.Tensor,
    prompt: tuple[int, ...] = (),
    output: tuple[int, ...] = (),
    **params: object,
) -> torch.Tensor:
    out = logits.clone()
    adjust(out, SamplingParams(max_tokens=1, **params), prompt, output)  # type: ignore[arg-type]
    return out


def test_plain_parameters_adjust_nothing() -> None:
    assert not adjusts(PLAIN)
    assert adjusts(SamplingParams(max_tokens=1, top_k=5))


def test_logit_bias_adds_to_the_named_tokens_only() -> None:
    out = adjusted(row(1, 2, 3), logit_bias=((0, 5.0), (2, -100.0), (99, 1.0)))
    assert out.tolist() == [6, 2, -97]


def test_repetition_penalty_divides_positive_and_multiplies_negative_seen_logits() -> None:
    out = adjusted(row(2.0, -2.0, 4.0), prompt=(0,), output=(1,), repetition_penalty=2.0)
    assert out.tolist() == [1.0, -4.0, 4.0]  # token 2 was never seen


def test_presence_and_frequency_penalties_count_the_output_only() -> None:
    out = adjusted(
        row(0, 0, 0, 0),
        prompt=[3, 3],
        output=[1, 1, 2],
        presence_penalty=1.0,
        frequency_penalty=0.5,
    )
    assert out.tolist() == [0.0, -2.0, -1.5, 0.0]


def test_top_k_keeps_the_k_largest() -> None:
    out = adjusted(row(1, 5, 3, 4), top_k=2)
    assert out.tolist() == [-math.inf, 5, -math.inf, 4]


def test_min_p_drops_tokens_below_a_share_of_the_top_probability() -> None:
    logits = row(0.0, math.log(0.5), math.log(0.05))  # probabilities in proportion 1 : 0.5 : 0.05
    out = adjusted(logits, min_p=0.1, temperature=1.0)
    assert out[:2].tolist() == logits[:2].tolist() and out[2] == -math.inf
