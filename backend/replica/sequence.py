"""One choice of a request inside the loop: where it is (its phase and the tokens the runner
holds), its sampling state, and the text it has to deliver."""

from __future__ import annotations

import time
from collections.abc import Callable

import torch

from backend.generation import Delta, FinishReason, SamplingParams, TokenLogprob
from backend.replica.detokenizer import Decoder, IncrementalDetokenizer, StopSequenceFilter
from backend.replica.processors import adjust, adjusts
from backend.replica.sampler import make_generator
from backend.replica.scheduler import Phase, SeqState
from backend.structured import Constraint


class Sequence:
    """One choice of a request: the scheduler's view of it (`state`), the sampler's (`mask`,
    `adjust`, `params`, `generator`) and delivery's (`accept`, `fail`)."""

    def __init__(
        self,
        seq_id: int,
        prompt_ids: list[int],
        params: SamplingParams,
        tokenizer: Decoder,
        deliver: Callable[[Delta | BaseException], None],
        index: int = 0,
    ) -> None:
        self.id = seq_id
        self.arrival = seq_id  # overwritten with the request's first id: choices share an age
        self.index = index  # its choice among the request's
        self.prompt_ids = prompt_ids
        self.phase = Phase.WAITING
        self.computed = 0  # tokens the runner holds for it
        self.ever_started = False  # its prompt was counted (not again after a preemption)
        self.params = params
        self.generator = make_generator(params)
        self.next_token = -1
        self.cancelled = False  # set from the event loop's thread; read by the batching loop
        self.constraint: Constraint | None = None  # set by `stream` for a grammar
        # Every choice of the request (this one too): one that fails ends them all.
        self.request: list[Sequence] = [self]
        # The first choice, while its prompt is not in: this one forks from it then.
        self.parent: Sequence | None = None
        self._deliver = deliver
        self._detokenizer = IncrementalDetokenizer(tokenizer)
        self._stops = StopSequenceFilter(params.stop)
        self._generated = 0
        self._unreported = 0
        self._cached = 0  # reported with the first delta
        self._prompt_length = len(prompt_ids)
        self._sampled: list[int] = []
        self._sampled_at: list[float] = []  # of the tokens not yet reported
        self._logprobs: list[TokenLogprob] = []  # of the tokens not yet reported, if asked
        self._adjusts = adjusts(params)

    def state(self, cached: int = 0) -> SeqState:
        """What the scheduler sees; `cached`: for a sequence without a slot, the prompt tokens
        the runner would resume it from."""
        held = self.phase in (Phase.PREFILLING, Phase.DECODING)
        return SeqState(
            seq_id=self.id,
            arrival=self.arrival,
            phase=self.phase,
            tokens=len(self.prompt_ids),
            computed=self.computed if held else cached,
            parent=None if self.parent is None else self.parent.id,
        )

    @property
    def prompt_left(self) -> int:
        """Prompt tokens the runner does not hold yet."""
        return len(self.prompt_ids) - self.computed

    def start_at(self, cached: int) -> bool:
        """The runner took it, holding the prompt's first `cached` tokens already; True the first
        time (a preempted sequence's prompt and cached tokens were counted then)."""
        self.phase, self.computed = Phase.PREFILLING, cached
        if not self._sampled and self.index == 0:  # reported once, for the request's prompt
            self._cached = cached
        first, self.ever_started = not self.ever_started, True
        return first

    def prefilled(self, tokens: int) -> None:
        """`tokens` more of its prompt are in."""
        self.computed += tokens

    def start_forked(self) -> None:
        """The runner holds the whole prompt, copied from a sibling's prefill (whose first delta
        reports the prompt's cached tokens, once per request)."""
        self.phase, self.computed = Phase.PREFILLING, len(self.prompt_ids)
        self.ever_started = True
        self.parent = None

    def requeue(self) -> None:
        """Preempted: prefill again the prompt and every token sampled so far (the last one not
        yet fed), so that the prefill's logits are those of the next decode step."""
        self.prompt_ids = self.prompt_ids[: self._prompt_length] + self._sampled
        self.phase, self.computed = Phase.PREEMPTED, 0

    def mask(self, logits: torch.Tensor) -> None:
        """Forbid the tokens the request's grammar does not allow next (its row, in place)."""
        if self.constraint is not None:
            self.constraint.mask(logits)

    def adjust(self, logits: torch.Tensor) -> None:
        """Apply the request's logits processors to its row (float, already masked), in place:
        after the mask, a cut never leaves a row empty that the grammar left some token."""
        if self._adjusts:
            adjust(logits, self.params, self.prompt_ids[: self._prompt_length], self._sampled)

    def accept(
        self, token_id: int, eos_ids: frozenset[int], logprob: TokenLogprob | None = None
    ) -> bool:
        """Take the sampled token, deliver any finished text; return True when done."""
        if self.constraint is not None:
            self.constraint.advance(token_id)
        if self.phase is Phase.DECODING:
            self.computed += 1  # the token it was fed this step
        self.phase = Phase.DECODING
        self.next_token = token_id
        self._sampled.append(token_id)
        self._sampled_at.append(time.monotonic())
        if logprob is not None:
            self._logprobs.append(logprob)
        self._generated += 1
        self._unreported += 1
        if token_id in eos_ids and not self.params.ignore_eos:
            self._finish("", "stop")
            return True
        text, stopped = self._stops.feed(self._detokenizer.push(token_id))
        if stopped:
            self._emit(text, "stop")
            return True
        if self._generated >= self.params.max_tokens:
            self._finish(text, "length")
            return True
        if text:
            self._emit(text, None)
        return False

    def fail(self, error: BaseException) -> None:
        """Deliver an error; the request ends with it, so its other choices are not wanted."""
        for choice in self.request:
            choice.cancelled = True
        self._deliver(error)

    def _finish(self, text: str, reason: FinishReason) -> None:
        tail, stopped = self._stops.feed(self._detokenizer.flush())
        text += tail if stopped else tail + self._stops.flush()
        self._emit(text, "stop" if stopped else reason)

    def _emit(self, text: str, finish_reason: FinishReason | None) -> None:
        times, logprobs = tuple(self._sampled_at), tuple(self._logprobs)
        delta = Delta(
            text=text,
            tokens=self._unreported,
            finish_reason=finish_reason,
            cached_tokens=self._cached,
            token_times=times,
            logprobs=logprobs,
            index=self.index,
        )
        self._deliver(delta)
        self._unreported = self._cached = 0
        self._sampled_at.clear()
        self._logprobs.clear()
