"""Choosing the next token of every stream in a batch from one logits tensor."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from backend.generation import SamplingParams

# Candidates kept before the nucleus is cut. A row whose nucleus is wider than this (a flat
# distribution, or top_p = 1) falls back to the whole vocabulary, so the result is exact either way.
_TOP_K = 64


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
    The nucleus is found among the top few candidates (a partial sort), and rows without a seed
    are drawn together; a seeded row draws alone from its own generator, so its tokens do not
    depend on which other streams share the batch.
    """
    logits = logits.float()
    chosen = logits.argmax(dim=-1).tolist()
    rows = [i for i, p in enumerate(params) if p.temperature > 0]
    if not rows:
        return chosen
    temperatures = torch.tensor([params[i].temperature for i in rows]).unsqueeze(1)
    probs = torch.softmax(logits[rows] / temperatures, dim=-1)
    top_ps = torch.tensor([params[i].top_p for i in rows]).unsqueeze(1)
    top, top_ids = probs.topk(min(_TOP_K, probs.shape[-1]), dim=-1)
    narrow = (top.sum(dim=-1, keepdim=True) >= top_ps).squeeze(1).tolist()
    for fits in (True, False):
        group = [k for k, n in enumerate(narrow) if n == fits]
        if not group:
            continue
        if fits:
            candidates, ids = top[group], top_ids[group]
        elif bool((top_ps[group] >= 1.0).all()):  # no cut at all: nothing to sort
            candidates = probs[group]
            ids = torch.arange(probs.shape[-1]).expand(len(group), -1)
        else:
            candidates, ids = probs[group].sort(dim=-1, descending=True)
        candidates = _nucleus(candidates, top_ps[group])
        picks = _draw(candidates, [generators[rows[k]] for k in group])
        for k, token in zip(group, ids.gather(1, picks).squeeze(1).tolist(), strict=True):
            chosen[rows[k]] = token
    return chosen


def _nucleus(sorted_probs: torch.Tensor, top_ps: torch.Tensor) -> torch.Tensor:
    """Zero the tail of each row (sorted, most likely first) beyond its `top_p` mass."""
    mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs
    return sorted_probs.masked_fill(mass_before >= top_ps, 0.0)  # the first token always stays


def _draw(probs: torch.Tensor, generators: Sequence[torch.Generator | None]) -> torch.Tensor:
    """One column index per row: unseeded rows in one call, seeded ones each from its generator."""
    picks = torch.empty(len(generators), 1, dtype=torch.long)
    unseeded = [i for i, g in enumerate(generators) if g is None]
    if unseeded:
        picks[unseeded] = torch.multinomial(probs[unseeded], 1)
    for i, generator in enumerate(generators):
        if generator is not None:
            picks[i] = torch.multinomial(probs[i], 1, generator=generator)
    return picks
