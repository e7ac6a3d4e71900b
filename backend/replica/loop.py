"""Continuous batching: one loop that shares a model's forward passes across many streams.

New requests join the running batch at the next step (after their own prefill), finished or
cancelled ones leave at once. A stream's first text goes out as soon as it is sampled; after that
its text goes out at most every `stream_interval_s`, merged (each item crosses Ray, the ingress and
the proxy, and costs them CPU the model needs).
Between two decode steps the loop prefills at most `prefill_budget` prompt tokens (in chunks, for
runners that can extend a prompt), so a burst of long prompts delays running streams' next token
by a bounded amount instead of freezing them.
Runners with prefix caching keep a finished sequence's KV: a new request first `resume`s from the
longest token prefix the runner still holds (the previous turn of its conversation, a shared
system prompt), and only the rest is prefilled and charged to the budget.
A request for `n` choices is `n` sequences: the first is prefilled, and the moment its prompt is
in, the runner `fork`s its KV to the others already admitted, which sample their first tokens from
the same logits (the rest, or all of them on a runner that cannot copy KV, are prefilled each).
The loop runs in one background thread (torch releases the GIL inside kernels); callers consume
their stream from asyncio. The model itself is behind `BatchRunner`, so the same loop drives the
CPU engine and the Neuron engine.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import itertools
import logging
import threading
import time
from collections.abc import AsyncGenerator, Callable
from contextlib import aclosing
from dataclasses import dataclass
from typing import ClassVar, Protocol

import torch

from backend.errors import EngineError, Preempt, SequencesFailed
from backend.generation import Delta, FinishReason, SamplingParams, TokenLogprob
from backend.replica.detokenizer import Decoder, IncrementalDetokenizer, StopSequenceFilter
from backend.replica.processors import adjust, adjusts
from backend.replica.sampler import make_generator, sample_next_tokens
from backend.structured import Constraint, GrammarTokenizer

logger = logging.getLogger(__name__)

# How often an idle loop wakes up to notice a shutdown.
_IDLE_POLL_S = 0.5
# Ray drops a gauge nobody has set for two export intervals (>= 2 s): report at least this often.
_OBSERVE_EVERY_S = 0.5


class BatchRunner(Protocol):
    """A model that runs prefill and decode steps on a batch of sequences named by id."""

    # True: `prefill` may be called again for the same sequence with the next chunk of its
    # prompt. False: it gets the whole prompt in one call.
    chunked_prefill: ClassVar[bool]
    # True: finished sequences' KV stays with the runner and `resume` reuses it. False: the loop
    # never calls `resume`, every prompt is prefilled from its first token.
    prefix_caching: bool
    # Sequences the runner holds at once: the loop runs at most this many.
    capacity: int

    def resume(self, seq_id: int, prompt_ids: list[int]) -> int:
        """Start a sequence from the longest prefix of `prompt_ids` the runner holds.

        Returns how many leading prompt tokens are already computed, at most `len(prompt_ids) - 1`
        (the last prompt token is always computed, for its logits); `prefill` gets the rest.
        """
        ...

    def prefill(self, seq_id: int, prompt_ids: list[int]) -> torch.Tensor:
        """Add (a chunk of) a sequence's prompt; return the logits ([vocab]) after its last token.

        `decode` is called only with sequences whose whole prompt has been prefilled.
        """
        ...

    def decode(self, seq_ids: list[int], token_ids: list[int]) -> torch.Tensor:
        """Feed one token per sequence; return next-token logits, [len(seq_ids), vocab].

        `seq_ids` is every sequence that has finished its prefill and not been released.
        """
        ...

    def fork(self, parent_id: int, child_id: int) -> bool:
        """Start `child_id` with a copy of everything `parent_id` holds (a prompt just prefilled,
        not yet decoding); False if this runner cannot copy KV, and then the loop prefills the
        child's prompt itself."""
        ...

    def release(self, seq_id: int) -> None:
        """Remove a finished sequence from the batch (a prefix-caching runner may keep its KV)."""
        ...

    def reset(self) -> None:
        """Forget every sequence (after a failed step)."""
        ...

    def kv_usage(self) -> float:
        """Share (0 to 1) of the KV cache holding running sequences' tokens (parked prefixes,
        which give way to new requests, count as free, as in vLLM's `kv_cache_usage_perc`)."""
        ...


class BatchObserver(Protocol):
    """Told the loop's occupancy when it changes, and again every half second (metrics)."""

    def batch_changed(self, running: int, waiting: int, kv_usage: float) -> None:
        """`running` streams in the batch, `waiting` submitted and not yet admitted, and the
        runner's KV cache usage."""
        ...

    def preempted(self) -> None:
        """A running stream was sent back to be computed again (its runner ran short of KV)."""
        ...


@dataclass
class BatcherStats:
    """Counters of the loop, for benchmarks and metrics."""

    prefills: int = 0
    decode_steps: int = 0
    decoded_tokens: int = 0
    prompt_tokens: int = 0
    cached_tokens: int = 0  # prompt tokens resumed from the runner's KV, not prefilled
    forks: int = 0  # choices started from a sibling's prefilled prompt, not prefilled
    preemptions: int = 0  # streams sent back to be computed again (the runner ran short of KV)

    @property
    def mean_batch_size(self) -> float:
        """Average number of streams sharing one decode step."""
        return self.decoded_tokens / self.decode_steps if self.decode_steps else 0.0


class _Sequence:
    """One request inside the loop: its sampling state, detokenizer and delivery channel."""

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
        self.index = index  # its choice among the request's
        self.prompt_ids = prompt_ids
        self.prefilled = 0  # prompt tokens the runner holds
        self.started = False  # resumed (or not) by the runner: `prefilled` counts from here
        self.params = params
        self.generator = make_generator(params)
        self.next_token = -1
        self.cancelled = False  # set from the event loop's thread; read by the batching loop
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
        self.constraint: Constraint | None = None  # set by `stream` for a grammar
        # Every choice of the request (this one too): one that fails ends them all.
        self.request: list[_Sequence] = [self]
        # The other choices, to start from this one's prompt when it is first prefilled.
        self.siblings: list[_Sequence] = []

    def start_at(self, cached: int) -> None:
        """The runner already holds the prompt's first `cached` tokens."""
        self.prefilled = cached
        if not self._sampled and self.index == 0:  # reported once, for the request's prompt
            self._cached = cached
        self.started = True

    def start_forked(self) -> None:
        """The runner holds the whole prompt, copied from a sibling's prefill (whose first delta
        reports the prompt's cached tokens, once per request)."""
        self.prefilled = len(self.prompt_ids)
        self.started = True

    def requeue(self) -> None:
        """Preempted: prefill again the prompt and every token sampled so far (the last one not
        yet fed), so that the prefill's logits are those of the next decode step."""
        self.prompt_ids = self.prompt_ids[: self._prompt_length] + self._sampled
        self.prefilled = 0
        self.started = False

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


class _Inbox:
    """Submitted requests the loop has not admitted yet. Once closed (the loop's last act) it
    refuses new ones, so every request either reaches the loop or is refused to its caller."""

    def __init__(self) -> None:
        self._items: collections.deque[_Sequence] = collections.deque()
        self._changed = threading.Condition()
        self._closed = False
        self._interrupted = False

    def put(self, seqs: list[_Sequence]) -> None:
        """Queue a request's sequences for the loop, together (its first choice is never taken
        alone, to be prefilled before its siblings can share it); raises once the loop has
        stopped taking requests."""
        with self._changed:
            if self._closed:
                raise EngineError("The batching loop is not running.")
            self._items.extend(seqs)
            self._changed.notify()

    def get(self, timeout_s: float) -> _Sequence | None:
        """The oldest request still wanted, waiting up to `timeout_s` for one; None if there is
        none, or `interrupt` was called."""
        with self._changed:
            self._changed.wait_for(lambda: self._items or self._interrupted, timeout_s)
            while self._items:
                seq = self._items.popleft()
                if not seq.cancelled:
                    return seq
            return None

    def waiting(self) -> int:
        """Requests queued whose callers still wait for them (a request's choices, once)."""
        with self._changed:
            return len({id(seq.request) for seq in self._items if not seq.cancelled})

    def interrupt(self) -> None:
        """Wake a waiting `get` (the loop is stopping)."""
        with self._changed:
            self._interrupted = True
            self._changed.notify_all()

    def close(self) -> list[_Sequence]:
        """Refuse new requests from now on; returns the ones still queued."""
        with self._changed:
            self._closed = True
            left, self._items = list(self._items), collections.deque()
            return left


class ContinuousBatcher:
    """Runs the batching loop in a thread; `stream()` submits a request and yields its deltas."""

    def __init__(
        self,
        runner: BatchRunner,
        tokenizer: Decoder,
        eos_ids: frozenset[int],
        prefill_budget: int = 512,
        observer: BatchObserver | None = None,
        stream_interval_s: float = 0.0,
    ) -> None:
        self._runner = runner
        self._caching = runner.prefix_caching
        self._prefill_budget = prefill_budget
        self._stream_interval_s = stream_interval_s
        self._observer = observer
        self._occupancy = (0, 0)
        self._kv_usage = 0.0
        self._observed_at = 0.0
        self._tokenizer = tokenizer
        self._eos_ids = eos_ids
        self._grammar_tokenizer = GrammarTokenizer(tokenizer, eos_ids)
        self._inbox = _Inbox()
        self._prefilling: collections.deque[_Sequence] = collections.deque()  # in arrival order
        # Preempted, waiting for memory: back to prefill when a running stream finishes.
        self._preempted: collections.deque[_Sequence] = collections.deque()
        self._active: list[_Sequence] = []  # decoding
        self._ids = itertools.count()
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="continuous-batcher", daemon=True)
        self.stats = BatcherStats()

    def start(self) -> None:
        """Start the loop thread."""
        self._thread.start()

    def shutdown(self) -> None:
        """Stop the loop; streams still running get an error."""
        self._stopping.set()
        self._inbox.interrupt()
        self._thread.join(timeout=10)

    def is_alive(self) -> bool:
        """Whether the loop runs and takes requests (not stopping)."""
        return self._thread.is_alive() and not self._stopping.is_set()

    async def stream(
        self, prompt_ids: list[int], params: SamplingParams
    ) -> AsyncGenerator[Delta, None]:
        """Submit a request and yield its deltas (of its `params.n` choices, interleaved, each
        tagged with its `index`); leaving early frees its batch slots."""
        if not self.is_alive():
            raise EngineError("The batching loop is not running.")
        if not prompt_ids:
            raise EngineError("There is no prompt to generate from.")
        if params.n < 1:
            raise EngineError("A request needs at least one choice.")
        loop = asyncio.get_running_loop()
        deltas: asyncio.Queue[Delta | BaseException] = asyncio.Queue()

        def deliver(item: Delta | BaseException) -> None:
            with contextlib.suppress(RuntimeError):  # the event loop has closed: nobody listens
                loop.call_soon_threadsafe(deltas.put_nowait, item)

        seqs = [
            _Sequence(
                next(self._ids), prompt_ids, params.for_choice(i), self._tokenizer, deliver, i
            )
            for i in range(params.n)
        ]
        constraints = await self._constraints(params)
        for seq, constraint in zip(seqs, constraints, strict=True):
            seq.request = seqs
            seq.constraint = constraint
        seqs[0].siblings = seqs[1:]
        try:
            self._inbox.put(seqs)  # raises if the loop has stopped meanwhile
            async with aclosing(self._delivered(deltas, len(seqs))) as delivered:
                async for delta in delivered:
                    yield delta
        finally:
            for seq in seqs:
                seq.cancelled = True

    async def _constraints(self, params: SamplingParams) -> list[Constraint | None]:
        """A matcher for each of the request's choices: the grammar compiled once, in a worker
        thread (neither the event loop nor the batching loop waits on it), and copied for the
        other choices."""
        if params.grammar is None:
            return [None] * params.n
        grammar = params.grammar
        try:
            first = await asyncio.to_thread(
                lambda: Constraint(self._grammar_tokenizer.get(), grammar)
            )
        except Exception as exc:
            raise EngineError(f"Generation failed before prefill: {exc}") from exc
        return [first, *(first.copy() for _ in range(params.n - 1))]

    async def _delivered(
        self, deltas: asyncio.Queue[Delta | BaseException], choices: int
    ) -> AsyncGenerator[Delta, None]:
        """The deltas of `choices` streams until each has finished: the first text at once, then
        at most one item per choice every `stream_interval_s`, merging what arrived meanwhile
        (each item crosses Ray, the ingress and the proxy, and costs them CPU the model needs)."""
        loop = asyncio.get_running_loop()
        next_send = 0.0  # the first text goes out at once
        unfinished = choices
        while unfinished:
            items = [await deltas.get()]
            if _open(items[-1]) and (wait := next_send - loop.time()) > 0:
                await asyncio.sleep(wait)
            while not deltas.empty():
                items.append(deltas.get_nowait())
            # What came before an error still goes out; the error ends the request.
            failed = next((i for i, item in enumerate(items) if not isinstance(item, Delta)), None)
            ready = [item for item in items[:failed] if isinstance(item, Delta)]
            for delta in _merge_by_choice(ready):
                if delta.finish_reason is not None:
                    unfinished -= 1
                yield delta
            next_send = loop.time() + self._stream_interval_s
            if failed is not None:
                error = items[failed]
                assert isinstance(error, BaseException)
                raise error

    def occupancy(self) -> tuple[int, int]:
        """Requests running and requests waiting, as last observed (`_requests`)."""
        return self._occupancy

    def _run(self) -> None:
        try:
            while not self._stopping.is_set():
                try:
                    self._admit_waiting()
                    self._drop_cancelled()
                    self._prefill_within_budget()
                    if self._active:
                        self._decode_step()
                    self._observe()
                except Exception as exc:  # a bug: fail what is running, never the loop
                    logger.exception("batching loop step failed")
                    self._fail_active(EngineError(f"Generation failed: {exc}"))
        finally:  # every request the loop took, or that is still queued, gets its end
            stopped = EngineError("The engine is shutting down.")
            self._fail_active(stopped)
            for seq in self._inbox.close():
                seq.fail(stopped)
            self._observe()

    def _fail_active(self, error: EngineError) -> None:
        with contextlib.suppress(Exception):
            self._runner.reset()
        for seq in (*self._prefilling, *self._active, *self._preempted):
            seq.fail(error)
        self._prefilling.clear()
        self._preempted.clear()
        self._active.clear()

    def _observe(self) -> None:
        occupancy = self._requests()
        kv_usage = round(self._runner.kv_usage(), 2)  # a new figure per percent, not per token
        now = time.monotonic()
        changed = (occupancy, kv_usage) != (self._occupancy, self._kv_usage)
        if not changed and now - self._observed_at < _OBSERVE_EVERY_S:
            return
        self._occupancy, self._kv_usage, self._observed_at = occupancy, kv_usage, now
        if self._observer is not None:
            self._observer.batch_changed(*occupancy, kv_usage)

    def _requests(self) -> tuple[int, int]:
        """Requests running (one of their choices started: prefilling or decoding) and
        waiting (queued, preempted, or not started yet), each once whatever its `n`: vLLM's
        `num_requests_running` and `num_requests_waiting`."""
        running = {id(s.request) for s in (*self._prefilling, *self._active) if s.started}
        held = {id(s.request) for s in (*self._prefilling, *self._preempted)} - running
        return len(running), len(held) + self._inbox.waiting()

    def _running(self) -> int:
        return len(self._prefilling) + len(self._active) + len(self._preempted)

    def _admit_waiting(self) -> None:
        while self._running() < self._runner.capacity:
            # Block only when there is nothing to do.
            seq = self._inbox.get(0 if self._running() else _IDLE_POLL_S)
            if seq is None:
                return
            self._prefilling.append(seq)

    def _prefill_within_budget(self) -> None:
        """Prefill waiting prompts, oldest first, up to the budget of tokens per decode step.

        Only tokens the runner computes are charged: a resumed prefix is free.
        """
        budget = self._prefill_budget
        while self._prefilling and budget > 0:
            seq = self._prefilling[0]
            if seq.cancelled:  # its request failed or was left since this step began
                self._prefilling.popleft()
                self._runner.release(seq.id)
                continue
            if not seq.started and not self._start(seq):
                continue
            left = len(seq.prompt_ids) - seq.prefilled
            if self._runner.chunked_prefill:
                left = min(left, budget)
            elif left > budget and budget < self._prefill_budget:
                return  # a whole prompt that does not fit waits for the next step
            budget -= left
            self._prefill(seq, seq.prompt_ids[seq.prefilled : seq.prefilled + left])

    def _start(self, seq: _Sequence) -> bool:
        """Resume the sequence from the runner's longest matching prefix; False if that failed."""
        try:
            cached = self._runner.resume(seq.id, seq.prompt_ids) if self._caching else 0
        except Exception as exc:
            logger.exception("resuming a prefix failed")
            self._prefilling.popleft()
            self._runner.release(seq.id)
            seq.fail(EngineError(f"Generation failed before prefill: {exc}"))
            return False
        seq.start_at(cached)
        self.stats.prompt_tokens += len(seq.prompt_ids)
        self.stats.cached_tokens += cached
        return True

    def _prefill(self, seq: _Sequence, chunk: list[int]) -> None:
        try:
            logits = self._runner.prefill(seq.id, chunk)
            seq.prefilled += len(chunk)
            if seq.prefilled < len(seq.prompt_ids):
                return
            self._prefilling.popleft()
        except Exception as exc:
            logger.exception("prefill failed")
            if self._prefilling and self._prefilling[0] is seq:
                self._prefilling.popleft()
            self._runner.release(seq.id)
            seq.fail(EngineError(f"Generation failed during prefill: {exc}"))
            return
        self.stats.prefills += 1
        batch = [seq, *self._fork_siblings(seq)]
        try:
            rows = logits.repeat(len(batch), 1)  # a row each: the sampler adjusts rows in place
            outcomes = self._sample(batch, rows)
        except Exception as exc:  # a bug: these sequences are in no queue `_fail_active` sees
            logger.exception("sampling after a prefill failed")
            for member in batch:
                self._runner.release(member.id)
                member.fail(EngineError(f"Generation failed while sampling: {exc}"))
            return
        for member, outcome in zip(batch, outcomes, strict=True):
            if isinstance(outcome, Exception):
                self._runner.release(member.id)
                member.fail(EngineError(f"Generation failed while sampling: {outcome}"))
            elif not self._accept(member, *outcome):
                self._active.append(member)

    def _fork_siblings(self, seq: _Sequence) -> list[_Sequence]:
        """The request's other choices waiting in the loop, started from `seq`'s prompt, just
        prefilled for the first time, when the runner can copy it; the others are prefilled as
        any prompt."""
        siblings, seq.siblings = seq.siblings, []  # once: a preempted `seq` comes back longer
        forked: list[_Sequence] = []
        for sibling in siblings:
            if sibling not in self._prefilling or sibling.started or sibling.cancelled:
                continue  # not admitted yet (the batch is full), or gone
            try:
                copied = self._runner.fork(seq.id, sibling.id)
            except Exception:
                logger.exception("forking a prefilled prompt failed; prefilling it again")
                self._runner.release(sibling.id)
                continue
            if not copied:
                break
            self._prefilling.remove(sibling)
            sibling.start_forked()
            forked.append(sibling)
        self.stats.forks += len(forked)
        return forked

    def _drop_cancelled(self) -> None:
        for queue_ in (self._prefilling, self._active, self._preempted):
            for seq in [s for s in queue_ if s.cancelled]:
                self._runner.release(seq.id)
                queue_.remove(seq)
                if seq.started and queue_ is not self._preempted:  # it held memory
                    self._resume_preempted()
        if self._preempted and not self._active and not self._prefilling:
            # Nothing else holds memory (the last stream ended in its prefill, say).
            self._resume_preempted()

    def _resume_preempted(self) -> None:
        """A running stream let its memory go (it finished, failed or was cancelled): the
        oldest preempted stream goes on."""
        if self._preempted:
            self._prefilling.appendleft(self._preempted.popleft())

    def _decode_step(self) -> None:
        batch = list(self._active)
        try:
            logits = self._runner.decode([s.id for s in batch], [s.next_token for s in batch])
        except SequencesFailed as exc:  # the others were not touched: they go on next step
            for seq in [s for s in batch if s.id in exc.seq_ids]:
                self._end(seq, EngineError(f"Generation failed: {exc}"))
            return
        except Preempt as exc:
            for seq in [s for s in batch if s.id in exc.seq_ids]:
                self._preempt(seq)
            return
        except Exception as exc:
            logger.exception("decode step failed")
            self._fail_active(EngineError(f"Generation failed: {exc}"))
            return
        self.stats.decode_steps += 1
        self.stats.decoded_tokens += len(batch)
        for seq, choice in zip(batch, self._sample(batch, logits), strict=True):
            if isinstance(choice, Exception):  # that stream alone ends
                self._end(seq, EngineError(f"Generation failed while sampling: {choice}"))
                continue
            if self._accept(seq, *choice):
                self._active.remove(seq)
                self._resume_preempted()

    def _accept(self, seq: _Sequence, token: int, logprob: TokenLogprob | None) -> bool:
        """Give `seq` its token; True when it is done (finished, or failed alone: its text could
        not be made), and then released. It must not be in `_prefilling`."""
        try:
            done = seq.accept(token, self._eos_ids, logprob)
        except Exception as exc:
            logger.exception("delivering a token failed")
            seq.fail(EngineError(f"Generation failed while detokenizing: {exc}"))
            done = True
        if done:
            self._runner.release(seq.id)
        return done

    def _sample(
        self, batch: list[_Sequence], logits: torch.Tensor
    ) -> list[tuple[int, TokenLogprob | None] | Exception]:
        """The next token of each sequence (with its log-probability, if asked); a row the
        sampler cannot take (its logits, parameters, grammar or log-probabilities) is that
        row's exception alone.

        One order for every engine (vLLM's, and llama.cpp's grammar first): the grammar mask,
        then logit bias and penalties, then temperature with the top-k / min-p / top-p cuts, and
        the draw. It works on a float32 copy it owns: the engine's tensor may be an inference
        tensor (in place updates of it fail) and is never changed. Log-probabilities describe
        the model's distribution over what the grammar allows, before bias, penalties and
        temperature (as vLLM's default `raw_logprobs`, whose grammar mask comes before its
        sampler). Only rows whose requests ask for processors, a grammar or log-probabilities
        cost anything beyond the batch's sampling."""
        logits = logits.to(torch.float32, copy=True)
        failed: dict[int, Exception] = {}
        scores: dict[int, torch.Tensor] = {}
        for row, seq in enumerate(batch):
            try:
                seq.mask(logits[row])
                if seq.params.logprobs is not None:
                    scores[row] = torch.log_softmax(logits[row], dim=-1)
                seq.adjust(logits[row])
            except Exception as exc:
                logger.exception("preparing a row's logits failed")
                failed[row] = exc
        tokens = self._sample_rows(batch, logits, failed)
        outcomes: list[tuple[int, TokenLogprob | None] | Exception] = []
        for row, seq in enumerate(batch):
            if row in failed:
                outcomes.append(failed[row])
                continue
            try:
                outcomes.append((tokens[row], self._logprob(seq, scores, row, tokens[row])))
            except Exception as exc:  # its log-probabilities: that stream alone ends
                logger.exception("a row's log-probabilities failed")
                outcomes.append(exc)
        return outcomes

    def _sample_rows(
        self, batch: list[_Sequence], logits: torch.Tensor, failed: dict[int, Exception]
    ) -> list[int]:
        """Sample every row at once; if that fails, row by row, recording the rows that fail."""
        params, generators = [s.params for s in batch], [s.generator for s in batch]
        if not failed:
            try:
                return list(sample_next_tokens(logits, params, generators))
            except Exception:
                logger.exception("sampling a batch failed; sampling its rows one by one")
        tokens = [0] * len(batch)
        for row in range(len(batch)):
            if row in failed:
                continue
            try:
                one = logits[row : row + 1]
                tokens[row] = sample_next_tokens(one, [params[row]], [generators[row]])[0]
            except Exception as exc:
                failed[row] = exc
        return tokens

    def _logprob(
        self, seq: _Sequence, scores: dict[int, torch.Tensor], row: int, token: int
    ) -> TokenLogprob | None:
        """OpenAI's log-probability entry of the sampled token, when the request asked."""
        if row not in scores or seq.params.logprobs is None:
            return None
        top = scores[row].topk(seq.params.logprobs) if seq.params.logprobs else None
        alternatives = (
            tuple(
                (self._tokenizer.decode([int(t)], skip_special_tokens=False), float(v))
                for v, t in zip(top.values, top.indices, strict=True)
                if v > float("-inf")  # a token the grammar forbids is no alternative
            )
            if top is not None
            else ()
        )
        text = self._tokenizer.decode([token], skip_special_tokens=False)
        return TokenLogprob(text, float(scores[row][token]), alternatives)

    def _preempt(self, seq: _Sequence) -> None:
        """Out of the batch until a running stream finishes, then prefilled again with its output
        so far as part of its prompt (as vLLM recomputes a preempted request); its stream just
        waits meanwhile."""
        self._runner.release(seq.id)
        self._active.remove(seq)
        seq.requeue()
        self._preempted.append(seq)
        self.stats.preemptions += 1
        if self._observer is not None:
            self._observer.preempted()
        logger.info("preempted a stream of %d tokens to free KV memory", len(seq.prompt_ids))

    def _end(self, seq: _Sequence, error: EngineError) -> None:
        """One running stream ends with an error; the batch goes on without it."""
        self._runner.release(seq.id)
        self._active.remove(seq)
        seq.fail(error)
        self._resume_preempted()


def _open(item: Delta | BaseException) -> bool:
    return isinstance(item, Delta) and item.finish_reason is None


def _merge_by_choice(deltas: list[Delta]) -> list[Delta]:
    """Consecutive deltas as one per choice, choices in the order they first appear."""
    by_choice: dict[int, list[Delta]] = {}
    for delta in deltas:
        by_choice.setdefault(delta.index, []).append(delta)
    return [_merge(group) for group in by_choice.values()]


def _merge(deltas: list[Delta]) -> Delta:
    """Consecutive deltas of one stream as one."""
    if len(deltas) == 1:
        return deltas[0]
    return Delta(
        text="".join(d.text for d in deltas),
        tokens=sum(d.tokens for d in deltas),
        finish_reason=deltas[-1].finish_reason,
        cached_tokens=sum(d.cached_tokens for d in deltas),
        token_times=tuple(t for d in deltas for t in d.token_times),
        logprobs=tuple(entry for d in deltas for entry in d.logprobs),
        index=deltas[0].index,
    )
