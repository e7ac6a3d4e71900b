"""Per-stream changes to a logits row before its token is sampled, in vLLM's order: logit bias,
then penalties (repetition over prompt and output; presence and frequency over the output), then
the candidate cuts that depend on the distribution (top-k, min-p).

Only the rows of streams that asked for one are touched, so the other streams in a batch pay
nothing; the temperature and top-p cut stay in `backend.replica.sampler`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from backend.generation import SamplingParams


def adjusts(params: SamplingParams) -> bool:
    """Whether `adjust` changes anything for these parameters."""
    return bool(
        params.logit_bias
        or params.repetition_penalty != 1.0
        or params.presence_penalty
        or params.frequency_penalty
        or params.top_k > 0
        or params.min_p > 0.0
    )


def adjust(
    logits: torch.Tensor, params: SamplingParams, prompt: Sequence[int], output: Sequence[int]
) -> None:
    """Apply `params`' bias, penalties and cuts to one row of float logits, in place."""
    vocab = logits.shape[-1]
    for token, bias in params.logit_bias:
        if 0 <= token < vocab:
            logits[token] += bias
    if params.repetition_penalty != 1.0:
        _repetition_penalty(logits, params.repetition_penalty, [*prompt, *output])
    if (params.presence_penalty or params.frequency_penalty) and output:
        counts = torch.bincount(torch.tensor(output), minlength=vocab)[:vocab].to(logits.dtype)
        logits -= params.frequency_penalty * counts + params.presence_penalty * (counts > 0)
    if 0 < params.top_k < vocab:
        kth = logits.topk(params.top_k).values[-1]
        logits.masked_fill_(logits < kth, float("-inf"))
    if params.min_p > 0.0 and params.temperature > 0:
        # prob < min_p x the top prob, at the request's temperature, in logit terms.
        floor = logits.max() + params.temperature * math.log(params.min_p)
        logits.masked_fill_(logits < floor, float("-inf"))


def _repetition_penalty(logits: torch.Tensor, penalty: float, seen: list[int]) -> None:
    """Every token already seen becomes less likely: a positive logit is divided by the
    penalty, a negative one multiplied (vLLM's and transformers' rule)."""
    tokens = torch.tensor(sorted(set(seen)), dtype=torch.long)
    tokens = tokens[tokens < logits.shape[-1]]
    values = logits[tokens]
    logits[tokens] = torch.where(values > 0, values / penalty, values * penalty)
