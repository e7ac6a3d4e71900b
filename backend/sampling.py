"""Choosing the next token of every stream in a batch from one logits tensor."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from backend.generation import SamplingParams


def make_generator(params: SamplingParams) -> torch.Generator | None:
    """A private random generator for a request with a seed; None means the global one."""
    if params.seed is None:
        return None
    generator = torch.Generator()
    generator.manual_seed(params.seed)
    return generator


def sample_next_tokens(
    logits: torch.Tensor,
    params: Sequence[SamplingParams],
    generators: Sequence[torch.Generator | None],
) -> list[int]:
    """One token per row of `logits` ([batch, vocab]), honouring each row's parameters.

    Greedy rows (temperature 0) take the argmax; the others are sampled from the
    temperature-scaled distribution, cut to the smallest nucleus holding `top_p` of the mass.
    Work is done for the whole batch at once; only the draw itself is per row (per-row seeds).
    """
    logits = logits.float()
    chosen = logits.argmax(dim=-1).tolist()
    rows = [i for i, p in enumerate(params) if p.temperature > 0]
    if not rows:
        return chosen
    temperatures = torch.tensor([params[i].temperature for i in rows]).unsqueeze(1)
    probs = torch.softmax(logits[rows] / temperatures, dim=-1)
    top_ps = torch.tensor([params[i].top_p for i in rows]).unsqueeze(1)
    if bool((top_ps < 1.0).any()):
        probs = _nucleus(probs, top_ps)
    for k, row in enumerate(rows):
        chosen[row] = int(torch.multinomial(probs[k], 1, generator=generators[row]))
    return chosen


def _nucleus(probs: torch.Tensor, top_ps: torch.Tensor) -> torch.Tensor:
    sorted_probs, order = probs.sort(dim=-1, descending=True)
    mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs
    sorted_probs[mass_before >= top_ps] = 0.0  # the most likely token always stays
    return torch.zeros_like(probs).scatter_(-1, order, sorted_probs)
