"""Value types of a generation, shared by the loop, the engines, the model server and the ingress.

The bottom of the package: it imports nothing from it.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Literal

FinishReason = Literal["stop", "length"]


@dataclass(frozen=True)
class SamplingParams:
    """Per-request generation parameters (already validated)."""

    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None
    ignore_eos: bool = False
    # Logits processors (backend.replica.processors); the defaults change nothing.
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    top_k: int = 0  # 0 = no cut
    min_p: float = 0.0
    logit_bias: tuple[tuple[int, float], ...] = ()
    # Log-probabilities of each sampled token and this many alternatives; None = none.
    logprobs: int | None = None
    # An llguidance grammar the reply must follow (backend.structured); None = free text.
    grammar: str | None = None
    # Choices generated from one prompt (they share its KV where the runner can copy it).
    n: int = 1

    def for_choice(self, index: int) -> SamplingParams:
        """The parameters of one of the `n` choices: a seed `s` becomes `s + index` (as vLLM's
        parallel sampling), so choice 0 is what the same request with `n=1` would say."""
        seed = None if self.seed is None else self.seed + index
        return replace(self, n=1, seed=seed)


@dataclass(frozen=True)
class TokenLogprob:
    """A sampled token's text and log-probability (of the model's own distribution, before
    sampling parameters), and the most likely alternatives at its position."""

    token: str
    logprob: float
    top: tuple[tuple[str, float], ...] = ()


@dataclass(frozen=True)
class Delta:
    """A piece of generated text, the number of tokens it took, and the finish reason at the end.

    `index` is the choice it belongs to (of a request's `n`); a stream of several choices
    interleaves their deltas. The stream's first delta also says how many prompt tokens were not
    computed again because the engine still held them (`cached_tokens`, a reused prefix); later
    deltas carry 0.
    `token_times` says when each of its tokens was sampled (`time.monotonic()` in the process that
    sampled it), so latency metrics time tokens, not the merged deltas that carry them; empty when
    the engine does not say.
    """

    text: str
    tokens: int
    finish_reason: FinishReason | None = None
    cached_tokens: int = 0
    token_times: tuple[float, ...] = ()
    logprobs: tuple[TokenLogprob, ...] = ()  # one per token, when the request asked
    index: int = 0


@dataclass(frozen=True)
class ModelInfo:
    """What the ingress needs to know about the model: its id, its window, whether it is ready."""

    model_id: str | None
    context_window: int
    ready: bool
    error: str | None = None


@dataclass(frozen=True)
class PromptAccepted:
    """The first event of every generation: the prompt fits and is queued. It carries what the
    ingress needs about the model, so the request path never asks the replica separately."""

    prompt_tokens: int
    model_id: str
    context_window: int
    # The chat template's own tool-call format the reply is written in (`backend.tool_formats`
    # names them); None: plain text, or the generic format.
    tool_format: str | None = None


GenerationEvent = PromptAccepted | Delta
