"""Choosing the next token of every stream in a batch from one logits tensor."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from backend.generation import SamplingParams

# Candidates kept before the nucleus is cut. A row whose nucleus is wider than this (a flat
# distribution) falls back to sorting the whole vocabulary, so the result is exact either way.
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
    Rows with no cut (top_p = 1) are not sorted at all, the nucleus of the others is found among
    the top few candidates (a partial sort). Every sampled row costs one uniform number: rows
    without a seed draw theirs together, a seeded row from its own generator, so its tokens do
    not depend on which other streams share the batch.
    """
    logits = logits.float()
    chosen = [0] * len(params)
    greedy = [i for i, p in enumerate(params) if p.temperature <= 0]
    if greedy:
        for i, token in zip(greedy, _rows(logits, greedy).argmax(dim=-1).tolist(), strict=True):
            chosen[i] = token
    rows = [i for i, p in enumerate(params) if p.temperature > 0]
    if not rows:
        return chosen
    temperatures = torch.tensor([params[i].temperature for i in rows]).unsqueeze(1)
    probs = torch.softmax(_rows(logits, rows) / temperatures, dim=-1)
    top_ps = [params[i].top_p for i in rows]
    uniforms = _uniforms([generators[i] for i in rows])
    for group, candidates, ids in _candidate_groups(probs, top_ps):
        picks = _inverse_cdf(candidates, uniforms[group])
        tokens = picks if ids is None else ids.gather(1, picks.unsqueeze(1)).squeeze(1)
        for k, token in zip(group, tokens.tolist(), strict=True):
            chosen[rows[k]] = token
    return chosen


def _candidate_groups(
    probs: torch.Tensor, top_ps: list[float]
) -> list[tuple[list[int], torch.Tensor, torch.Tensor | None]]:
    """Rows grouped by how their candidates are found: (rows, their candidate weights, the
    candidates' token ids, or None when the candidates are the whole vocabulary in order)."""
    uncut = [k for k, top_p in enumerate(top_ps) if top_p >= 1.0]
    groups: list[tuple[list[int], torch.Tensor, torch.Tensor | None]] = []
    if uncut:
        groups.append((uncut, _rows(probs, uncut), None))
    cut = [k for k, top_p in enumerate(top_ps) if top_p < 1.0]
    if not cut:
        return groups
    cut_ps = torch.tensor([top_ps[k] for k in cut]).unsqueeze(1)
    top, top_ids = probs[cut].topk(min(_TOP_K, probs.shape[-1]), dim=-1)
    fits = (top.sum(dim=-1, keepdim=True) >= cut_ps).squeeze(1).tolist()
    narrow = [j for j, fit in enumerate(fits) if fit]
    if narrow:
        groups.append(
            ([cut[j] for j in narrow], _nucleus(top[narrow], cut_ps[narrow]), top_ids[narrow])
        )
    wide = [j for j, fit in enumerate(fits) if not fit]
    if wide:
        ordered, ordered_ids = probs[[cut[j] for j in wide]].sort(dim=-1, descending=True)
        groups.append(([cut[j] for j in wide], _nucleus(ordered, cut_ps[wide]), ordered_ids))
    return groups


def _rows(tensor: torch.Tensor, rows: list[int]) -> torch.Tensor:
    """`tensor[rows]`, without copying when that is every row in order."""
    return tensor if rows == list(range(tensor.shape[0])) else tensor[rows]


def _nucleus(sorted_probs: torch.Tensor, top_ps: torch.Tensor) -> torch.Tensor:
    """Zero the tail of each row (sorted, most likely first) beyond its `top_p` mass."""
    mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs
    return sorted_probs.masked_fill(mass_before >= top_ps, 0.0)  # the first token always stays


def _uniforms(generators: Sequence[torch.Generator | None]) -> torch.Tensor:
    """One uniform number in [0, 1) per row: unseeded rows in one call, seeded ones each from
    its own generator."""
    uniforms = torch.empty(len(generators))
    unseeded = [i for i, g in enumerate(generators) if g is None]
    if unseeded:
        uniforms[unseeded] = torch.rand(len(unseeded))
    for i, generator in enumerate(generators):
        if generator is not None:
            uniforms[i] = torch.rand(1, generator=generator)
    return uniforms


def _inverse_cdf(weights: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """Per row, the column whose cumulative weight first exceeds `uniform` x the row's total:
    a draw in proportion to the weights (which need not sum to 1), that never picks a zero."""
    cdf = weights.cumsum(dim=-1)
    targets = (uniforms * cdf[:, -1]).unsqueeze(1)
    picks = torch.searchsorted(cdf, targets, right=True).squeeze(1)
    return picks.clamp_(max=weights.shape[-1] - 1)
