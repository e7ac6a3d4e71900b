"""The step executor: runs one `StepPlan` on the runner and turns every failure into the outcome
of the sequences it touches. The loop's `try`s live here, and no sequence can fail another.

A plan runs in its fields' order: preemptions, starts, the forward pass, forks of the prompts
that completed, then one draw for every row that has logits (`sampler.sample_rows`), then
delivery. A `mixed_batch` runner computes the step in one `step`; another gets a `prefill` per
chunk (whose completed prompts draw their first tokens), then one `decode` of every running
sequence, those included.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import cast

import torch

from backend.errors import EngineError
from backend.replica.detokenizer import Decoder
from backend.replica.runner import BatchRunner, MixedBatchRunner, SequencesFailed
from backend.replica.sampler import Row, Sampled, sample_rows
from backend.replica.scheduler import Phase, StepPlan
from backend.replica.sequence import Sequence

logger = logging.getLogger(__name__)


@dataclass
class BatcherStats:
    """Counters of the loop, for benchmarks and metrics."""

    steps: int = 0  # forward passes that computed tokens of several kinds at once, or not
    prefills: int = 0  # prompts completed (a preempted one again, too)
    decode_steps: int = 0
    decoded_tokens: int = 0
    prompt_tokens: int = 0  # of each request's prompt once, whatever preemptions follow
    cached_tokens: int = 0  # prompt tokens resumed from the runner's KV, not prefilled
    forks: int = 0  # choices started from a sibling's prefilled prompt, not prefilled
    preemptions: int = 0  # streams sent back to be computed again (the runner ran short of KV)
    mixed_steps: int = 0  # forward passes with decode tokens and prompt chunks together

    @property
    def mean_batch_size(self) -> float:
        """Average number of streams sharing one decode step."""
        return self.decoded_tokens / self.decode_steps if self.decode_steps else 0.0


@dataclass
class _Pass:
    """What one forward pass computed: the sequences that get a token, their logits rows."""

    rows: list[Sequence] = field(default_factory=list)
    logits: list[torch.Tensor] = field(default_factory=list)


class StepExecutor:
    """Runs plans on one runner; `run` returns the sequences that ended in the step."""

    def __init__(
        self, runner: BatchRunner, tokenizer: Decoder, eos_ids: frozenset[int], stats: BatcherStats
    ) -> None:
        self._runner = runner
        self._tokenizer = tokenizer
        self._eos_ids = eos_ids
        self.stats = stats
        self.can_fork = True  # until the runner says it cannot copy KV
        self._ended: list[Sequence] = []

    def run(self, plan: StepPlan, seqs: dict[int, Sequence]) -> list[Sequence]:
        """Apply `plan` to `seqs` (the loop's sequences by id); the ones that finished or failed
        are released and returned: the loop forgets them."""
        self._ended = []
        for seq_id in plan.preempt:
            self._preempt(seqs[seq_id])
        for seq_id in plan.start:
            self._start(seqs[seq_id])
        decodes = [seqs[i] for i in plan.decode]
        chunks = [
            (seqs[c.seq_id], self._chunk(seqs[c.seq_id], c.tokens))
            for c in plan.prefill
            if seqs[c.seq_id].phase is Phase.PREFILLING  # not failed while starting
        ]
        forks = [(seqs[p], seqs[c]) for p, c in plan.fork]
        if self._runner.mixed_batch:
            if decodes or chunks:
                self._sample(self._mixed(decodes, chunks, forks, seqs))
        else:
            self._separately(decodes, chunks, forks, seqs)
        return self._ended

    def _separately(
        self,
        decodes: list[Sequence],
        chunks: list[tuple[Sequence, list[int]]],
        forks: list[tuple[Sequence, Sequence]],
        seqs: dict[int, Sequence],
    ) -> None:
        """A `prefill` per chunk, then one `decode` of every running sequence, those whose
        prompts just completed included: a runner whose decode rewrites every live row
        (transformers-neuronx) must see each in every call."""
        prefilled = _Pass()
        for seq, chunk in chunks:
            self._prefill(seq, chunk, prefilled)
        self._fork(forks, prefilled)
        self._sample(prefilled)
        joined = [s for s in prefilled.rows if s.phase is Phase.DECODING and s not in self._ended]
        if decodes or joined:
            decoded = _Pass()
            self._decode([*decodes, *joined], decoded, seqs)
            self._sample(decoded)

    def _preempt(self, seq: Sequence) -> None:
        """Out of the batch, its KV released; prefilled again later with its output so far as
        part of its prompt (as vLLM recomputes a preempted request); its stream just waits."""
        self._runner.release(seq.id)
        seq.requeue()
        self.stats.preemptions += 1
        logger.info("preempted a stream of %d tokens to free KV memory", len(seq.prompt_ids))

    def _start(self, seq: Sequence) -> None:
        """Give the sequence a slot, resumed from the runner's longest matching prefix."""
        try:
            cached = self._runner.resume(seq.id, seq.prompt_ids) if self._caching else 0
        except Exception as exc:
            logger.exception("resuming a prefix failed")
            self._end(seq, EngineError(f"Generation failed before prefill: {exc}"))
            return
        if seq.start_at(cached):
            self.stats.prompt_tokens += len(seq.prompt_ids)
            self.stats.cached_tokens += cached

    @property
    def _caching(self) -> bool:
        return self._runner.prefix_caching

    def _chunk(self, seq: Sequence, planned: int) -> list[int]:
        """The prompt tokens to compute now: as planned, within what is left (a sequence started
        in this step may have resumed less, or more, than the plan assumed)."""
        size = min(planned, seq.prompt_left) if self._runner.chunked_prefill else seq.prompt_left
        return seq.prompt_ids[seq.computed : seq.computed + size]

    def _mixed(
        self,
        decodes: list[Sequence],
        chunks: list[tuple[Sequence, list[int]]],
        forks: list[tuple[Sequence, Sequence]],
        seqs: dict[int, Sequence],
    ) -> _Pass:
        """The plan's tokens in one forward pass, then the forks of the prompts it completed."""
        done = _Pass()
        lasts = [len(chunk) == seq.prompt_left for seq, chunk in chunks]
        try:
            logits = cast(MixedBatchRunner, self._runner).step(
                [(s.id, s.next_token) for s in decodes],
                [(s.id, chunk, last) for (s, chunk), last in zip(chunks, lasts, strict=True)],
            )
        except SequencesFailed as exc:  # the others were not touched: they go on next step
            self._refused(exc, [*decodes, *(s for s, _ in chunks)])
            return done
        except Exception as exc:
            self._pass_failed(exc, [*decodes, *(s for s, _ in chunks)], seqs)
            return done
        self.stats.steps += 1
        self.stats.mixed_steps += bool(decodes and chunks)
        self._decoded(decodes, logits[: len(decodes)], done)
        completed = iter(logits[len(decodes) :])
        for (seq, chunk), last in zip(chunks, lasts, strict=True):
            seq.prefilled(len(chunk))
            if last:
                self._completed(seq, next(completed), done)
        self._fork(forks, done)
        return done

    def _prefill(self, seq: Sequence, chunk: list[int], done: _Pass) -> None:
        try:
            logits = self._runner.prefill(seq.id, chunk)
        except Exception as exc:
            if not isinstance(exc, SequencesFailed):
                logger.exception("prefill failed")
            self._end(seq, EngineError(f"Generation failed during prefill: {exc}"))
            return
        self.stats.steps += 1
        seq.prefilled(len(chunk))
        if seq.prompt_left == 0:
            self._completed(seq, logits, done)

    def _decode(self, decodes: list[Sequence], done: _Pass, seqs: dict[int, Sequence]) -> None:
        try:
            logits = self._runner.decode([s.id for s in decodes], [s.next_token for s in decodes])
        except SequencesFailed as exc:
            self._refused(exc, decodes)
            return
        except Exception as exc:
            self._pass_failed(exc, decodes, seqs)
            return
        self.stats.steps += 1
        self._decoded(decodes, logits, done)

    def _decoded(self, decodes: list[Sequence], logits: torch.Tensor, done: _Pass) -> None:
        if decodes:
            self.stats.decode_steps += 1
            self.stats.decoded_tokens += len(decodes)
        done.rows += decodes
        done.logits += list(logits)

    def _completed(self, seq: Sequence, logits: torch.Tensor, done: _Pass) -> None:
        """Its prompt is all in: it samples its first token (again, if it was preempted)."""
        self.stats.prefills += 1
        done.rows.append(seq)
        done.logits.append(logits)

    def _fork(self, forks: list[tuple[Sequence, Sequence]], done: _Pass) -> None:
        """Copy each completed prompt to the choices waiting on it; they sample their first
        tokens from its logits. A choice that is not forked is prefilled as any prompt later."""
        completed = {id(seq): i for i, seq in enumerate(done.rows) if seq.phase is Phase.PREFILLING}
        for parent, child in forks:
            if id(parent) not in completed or child.cancelled or child.phase is not Phase.WAITING:
                continue
            if self.can_fork and self._copied(parent, child):
                child.start_forked()
                self.stats.forks += 1
                done.rows.append(child)
                done.logits.append(done.logits[completed[id(parent)]])
        for seq in done.rows:  # whoever was not forked now waits for a prompt of its own
            for choice in seq.request:
                if choice.parent is seq and seq.phase is Phase.PREFILLING:
                    choice.parent = None

    def _copied(self, parent: Sequence, child: Sequence) -> bool:
        try:
            copied = self._runner.fork(parent.id, child.id)
        except Exception:
            logger.exception("forking a prefilled prompt failed; prefilling it again")
            self._runner.release(child.id)
            return False
        self.can_fork = copied
        return copied

    def _sample(self, done: _Pass) -> None:
        if not done.rows:
            return
        rows: list[Row] = list(done.rows)
        outcomes = sample_rows(rows, torch.stack(done.logits), self._tokenizer)
        for seq, outcome in zip(done.rows, outcomes, strict=True):
            if isinstance(outcome, Sampled):
                self._accept(seq, outcome)
            else:
                self._end(seq, EngineError(f"Generation failed while sampling: {outcome}"))

    def _accept(self, seq: Sequence, sampled: Sampled) -> None:
        """Give `seq` its token; it ends when done, or when its text cannot be made."""
        try:
            done = seq.accept(sampled.token, self._eos_ids, sampled.logprob)
        except Exception as exc:
            logger.exception("delivering a token failed")
            self._end(seq, EngineError(f"Generation failed while detokenizing: {exc}"))
            return
        if done:
            self._runner.release(seq.id)
            self._ended.append(seq)

    def _refused(self, exc: SequencesFailed, touched: list[Sequence]) -> None:
        for seq in touched:
            if seq.id in exc.seq_ids:
                self._end(seq, EngineError(f"Generation failed: {exc}"))

    def _pass_failed(
        self, exc: Exception, touched: list[Sequence], seqs: dict[int, Sequence]
    ) -> None:
        """A forward pass failed as a whole: its sequences end; the runner's KV cannot be
        trusted, so it is reset and every other sequence holding some is recomputed."""
        logger.exception("a forward pass failed", exc_info=exc)
        error = EngineError(f"Generation failed: {exc}")
        for seq in touched:
            seq.fail(error)
            self._ended.append(seq)
        self._runner.reset()
        for seq in seqs.values():
            if seq not in touched and seq.phase in (Phase.PREFILLING, Phase.DECODING):
                seq.requeue()

    def _end(self, seq: Sequence, error: EngineError) -> None:
        """One sequence ends with an error; the others go on."""
        self._runner.release(seq.id)
        seq.fail(error)
        self._ended.append(seq)
