"""Choosing the next token of every stream in a batch from one logits tensor.

One order for every engine (vLLM's, and llama.cpp's grammar first), in `sample_rows`:
1. the grammar mask;
2. `logit_bias`;
3. penalties (repetition, frequency, presence);
4. temperature;
5. `top_k` / `top_p` / `min_p` (after the mask, so a cut never empties a row the grammar left
   some token);
6. the draw.
It works on a float32 copy it owns: the engine's tensor may be an inference tensor (in place
updates of it fail) and is never changed. Log-probabilities describe the model's distribution
over what the grammar allows, before bias, penalties and temperature (vLLM's default
`logprobs_mode`, `raw_logprobs`, whose grammar bitmask is applied before its sampler).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import torch

from backend.generation import SamplingParams, TokenLogprob
from backend.replica.detokenizer import Decoder

logger = logging.getLogger(__name__)

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


class Row(Protocol):
    """A stream as the sampler sees it: its parameters and its own changes to its logits row."""

    params: SamplingParams
    generator: torch.Generator | None

    def mask(self, logits: torch.Tensor) -> None:
        """Forbid, in place, what its grammar does not allow next (step 1)."""
        ...

    def adjust(self, logits: torch.Tensor) -> None:
        """Apply, in place, its logit bias, penalties and the top-k / min-p cuts (steps 2, 3 and
        5; those cuts are taken at the row's temperature, which `sample_next_tokens` applies
        with the top-p cut and the draw)."""
        ...


@dataclass(frozen=True)
class Sampled:
    """A row's next token, and its log-probability entry when the request asked."""

    token: int
    logprob: TokenLogprob | None = None


def sample_rows(
    rows: list[Row], logits: torch.Tensor, tokenizer: Decoder
) -> list[Sampled | Exception]:
    """The next token of each row of `logits`, in the module's order; a row the sampler cannot
    take (its logits, parameters, grammar or log-probabilities) is that row's exception alone.
    Only rows whose requests ask for processors, a grammar or log-probabilities cost anything
    beyond the batch's draw."""
    logits = logits.to(torch.float32, copy=True)
    failed: dict[int, Exception] = {}
    scores: dict[int, torch.Tensor] = {}
    for i, row in enumerate(rows):
        try:
            row.mask(logits[i])
            if row.params.logprobs is not None:
                scores[i] = torch.log_softmax(logits[i], dim=-1)
            row.adjust(logits[i])
        except Exception as exc:
            logger.exception("preparing a row's logits failed")
            failed[i] = exc
    tokens = _draw(rows, logits, failed)
    outcomes: list[Sampled | Exception] = []
    for i, row in enumerate(rows):
        if i in failed:
            outcomes.append(failed[i])
            continue
        try:
            entry = _logprob(row.params, scores.get(i), tokens[i], tokenizer)
            outcomes.append(Sampled(tokens[i], entry))
        except Exception as exc:  # its log-probabilities: that stream alone ends
            logger.exception("a row's log-probabilities failed")
            outcomes.append(exc)
    return outcomes


def _draw(rows: list[Row], logits: torch.Tensor, failed: dict[int, Exception]) -> list[int]:
    """Sample every row at once; if that fails, row by row, recording the rows that fail."""
    params, generators = [r.params for r in rows], [r.generator for r in rows]
    if not failed:
        try:
            return list(sample_next_tokens(logits, params, generators))
        except Exception:
            logger.exception("sampling a batch failed; sampling its rows one by one")
    tokens = [0] * len(rows)
    for i in range(len(rows)):
        if i in failed:
            continue
        try:
            tokens[i] = sample_next_tokens(logits[i : i + 1], [params[i]], [generators[i]])[0]
        except Exception as exc:
            failed[i] = exc
    return tokens


def _logprob(
    params: SamplingParams, scores: torch.Tensor | None, token: int, tokenizer: Decoder
) -> TokenLogprob | None:
    """OpenAI's log-probability entry of the sampled token, when the request asked."""
    if scores is None or params.logprobs is None:
        return None
    top = scores.topk(params.logprobs) if params.logprobs else None
    alternatives = (
        tuple(
            (tokenizer.decode([int(t)], skip_special_tokens=False), float(v))
            for v, t in zip(top.values, top.indices, strict=True)
            if v > float("-inf")  # a token the grammar forbids is no alternative
        )
        if top is not None
        else ()
    )
    text = tokenizer.decode([token], skip_special_tokens=False)
    return TokenLogprob(text, float(scores[token]), alternatives)


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
