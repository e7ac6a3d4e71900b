"""Continuous batching: one loop that shares a model's forward passes across many streams.

Each step, the loop hands the `scheduler` what it holds (as data) and gets a plan: which
sequences decode, which prompt chunks prefill under the step's token budget, what starts, forks
or is preempted. The `executor` runs the plan on the runner, in one forward pass where the
runner mixes prompt chunks and decode tokens (llama.cpp), so running streams move on every step
while prompts arrive; the `sampler` draws every row; `delivery` hands text to the callers.
New requests join at the next step, finished or cancelled ones leave at once.
Runners with prefix caching keep a finished sequence's KV: a new request first `resume`s from the
longest token prefix the runner still holds (the previous turn of its conversation, a shared
system prompt), and only the rest is prefilled and charged to the budget.
A request for `n` choices is `n` sequences: the first is prefilled, and in the step its prompt
is in, the runner `fork`s its KV to the others, which sample their first tokens from the same
logits (on a runner that cannot copy KV, each is prefilled).
Threads: the loop runs in one background thread (torch and llama.cpp release the GIL inside
kernels); callers consume their stream on the event loop. A request's grammar is compiled in a
worker thread before it reaches the loop, so neither loop waits on it.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import itertools
import logging
import threading
import time
from collections.abc import AsyncGenerator
from contextlib import aclosing
from typing import Protocol

from backend.errors import EngineError
from backend.generation import Delta, SamplingParams
from backend.replica.delivery import Item, Outbox, delivered, paced_interval
from backend.replica.detokenizer import Decoder
from backend.replica.executor import BatcherStats, StepExecutor
from backend.replica.runner import BatchRunner
from backend.replica.scheduler import Limits, Phase, SeqState, StepPlan, schedule
from backend.replica.sequence import Sequence
from backend.structured import Constraint, GrammarTokenizer

logger = logging.getLogger(__name__)

# How often an idle loop wakes up to notice a shutdown.
_IDLE_POLL_S = 0.5
# Ray drops a gauge nobody has set for two export intervals (>= 2 s): report at least this often.
_OBSERVE_EVERY_S = 0.5
_HOLDING = (Phase.PREFILLING, Phase.DECODING)


class BatchObserver(Protocol):
    """Told the loop's occupancy when it changes, and again every half second (metrics)."""

    def batch_changed(self, running: int, waiting: int, kv_usage: float) -> None:
        """`running` requests in the batch, `waiting` accepted and not running, and the share of
        the KV cache (or of its budget) running sequences hold."""
        ...

    def preempted(self) -> None:
        """A running stream was sent back to be computed again (its runner ran short of KV)."""
        ...


class _Inbox:
    """Submitted requests the loop has not admitted yet. Once closed (the loop's last act) it
    refuses new ones, so every request either reaches the loop or is refused to its caller."""

    def __init__(self) -> None:
        self._items: collections.deque[Sequence] = collections.deque()
        self._changed = threading.Condition()
        self._closed = False
        self._interrupted = False

    def put(self, seqs: list[Sequence]) -> None:
        """Queue a request's sequences for the loop, together (its first choice is never taken
        alone, to be prefilled before its siblings can share it); raises once the loop has
        stopped taking requests."""
        with self._changed:
            if self._closed:
                raise EngineError("The batching loop is not running.")
            self._items.extend(seqs)
            self._changed.notify()

    def get(self, timeout_s: float) -> Sequence | None:
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

    def close(self) -> list[Sequence]:
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
        token_budget: int = 256,
        observer: BatchObserver | None = None,
        stream_interval_s: float = 0.0,
        idle_token_budget: int | None = None,
        stream_updates_per_s: float = 0.0,
    ) -> None:
        self._runner = runner
        self._token_budget = token_budget  # at least the capacity (settings): all decode each step
        self._idle_token_budget = idle_token_budget  # steps with nothing decoding (`Limits`)
        self._stream_interval_s = stream_interval_s
        self._stream_updates_per_s = stream_updates_per_s  # all streams together; 0: no bound
        self._observer = observer
        self._occupancy = (0, 0)
        self._step_requests = 0  # requests the step in progress runs (`_execute`)
        self._kv_usage = 0.0
        self._observed_at = 0.0
        self._tokenizer = tokenizer
        self._grammar_tokenizer = GrammarTokenizer(tokenizer, eos_ids)
        self._inbox = _Inbox()
        self._seqs: dict[int, Sequence] = {}  # every sequence the loop holds, in arrival order
        self._ids = itertools.count()
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="continuous-batcher", daemon=True)
        self.stats = BatcherStats()
        self._executor = StepExecutor(runner, tokenizer, eos_ids, self.stats)

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
        posts: asyncio.Queue[list[Item]] = asyncio.Queue()

        def post(items: list[Item]) -> None:
            with contextlib.suppress(RuntimeError):  # the event loop has closed: nobody listens
                loop.call_soon_threadsafe(posts.put_nowait, items)

        outbox = Outbox(post, self._stream_interval)
        seqs = [
            Sequence(
                next(self._ids), prompt_ids, params.for_choice(i), self._tokenizer, outbox.put, i
            )
            for i in range(params.n)
        ]
        constraints = await self._constraints(params)
        for seq, constraint in zip(seqs, constraints, strict=True):
            seq.request, seq.arrival, seq.constraint = seqs, seqs[0].id, constraint
            seq.parent = seqs[0] if seq is not seqs[0] else None
        try:
            self._inbox.put(seqs)  # raises if the loop has stopped meanwhile
            async with aclosing(delivered(posts, len(seqs))) as items:
                async for delta in items:
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

    def _stream_interval(self) -> float:
        """A stream's interval between items while this step's requests run (asked on the loop
        thread, after a post)."""
        streams = self._step_requests
        return paced_interval(self._stream_interval_s, self._stream_updates_per_s, streams)

    def occupancy(self) -> tuple[int, int]:
        """Requests running and requests waiting, as last observed (`_requests`)."""
        return self._occupancy

    def _run(self) -> None:
        idle = True
        try:
            while not self._stopping.is_set():
                try:
                    self._take_requests(_IDLE_POLL_S if idle else 0)
                    self._drop_cancelled()
                    plan = schedule(self._states(), self._limits())
                    idle = plan.is_empty()
                    if not idle:
                        self._execute(plan)
                    self._observe()
                except Exception as exc:  # a bug: fail what is running, never the loop
                    logger.exception("batching loop step failed")
                    self._fail_all(EngineError(f"Generation failed: {exc}"))
        finally:  # every request the loop took, or that is still queued, gets its end
            stopped = EngineError("The engine is shutting down.")
            self._fail_all(stopped)
            for seq in self._inbox.close():
                seq.fail(stopped)
            self._observe()

    def _execute(self, plan: StepPlan) -> None:
        # The requests this step runs, its starts included: what the items it posts are paced at.
        ids = [*plan.decode, *plan.start, *(chunk.seq_id for chunk in plan.prefill)]
        self._step_requests = len({self._seqs[i].arrival for i in ids})
        preemptions = self.stats.preemptions
        for seq in self._executor.run(plan, self._seqs):
            self._seqs.pop(seq.id, None)
        if self._observer is not None:
            for _ in range(self.stats.preemptions - preemptions):
                self._observer.preempted()

    def _take_requests(self, timeout_s: float) -> None:
        """Move submitted requests into the loop while fewer than a batch of them wait there
        (the scheduler looks at those); block up to `timeout_s` only when the loop is idle."""
        while self._count(Phase.WAITING, Phase.PREEMPTED) < self._runner.capacity:
            seq = self._inbox.get(timeout_s)
            if seq is None:
                return
            self._seqs[seq.id] = seq
            timeout_s = 0

    def _count(self, *phases: Phase) -> int:
        return sum(seq.phase in phases for seq in self._seqs.values())

    def _drop_cancelled(self) -> None:
        for seq in [s for s in self._seqs.values() if s.cancelled]:
            self._runner.release(seq.id)
            del self._seqs[seq.id]

    def _states(self) -> list[SeqState]:
        """The scheduler's view. Waiting sequences that could start get the prefix the runner
        would resume them from (the first few, preempted ones first: a batch's worth)."""
        free = self._runner.capacity - self._count(*_HOLDING)
        candidates = sorted(
            (s for s in self._seqs.values() if s.phase not in _HOLDING),
            key=lambda s: (s.phase is not Phase.PREEMPTED, s.arrival, s.id),
        )[: max(free, 0)]
        states: dict[int, SeqState] = {}
        for seq in self._seqs.values():
            cached = self._lookup(seq) if seq in candidates else 0
            state = seq.state(cached)
            if seq.parent is not None and seq.parent.id not in self._seqs:
                state = SeqState(state.seq_id, state.arrival, state.phase, state.tokens, cached)
            states[seq.id] = state
        return list(states.values())

    def _lookup(self, seq: Sequence) -> int:
        if not self._runner.prefix_caching:
            return 0
        try:
            return self._runner.lookup(seq.prompt_ids)
        except Exception:  # `resume` will say what is wrong, to this request alone
            logger.exception("looking up a cached prefix failed")
            return 0

    def _limits(self) -> Limits:
        return Limits(
            slots=self._runner.capacity,
            token_budget=self._token_budget,
            idle_token_budget=self._idle_token_budget,
            kv_tokens=self._runner.kv_tokens,
            chunked_prefill=self._runner.chunked_prefill,
            can_fork=self._executor.can_fork,
        )

    def _fail_all(self, error: EngineError) -> None:
        with contextlib.suppress(Exception):
            self._runner.reset()
        for seq in self._seqs.values():
            seq.fail(error)
        self._seqs.clear()

    def _observe(self) -> None:
        occupancy = self._requests()
        kv_usage = round(self._kv_share(), 2)  # a new figure per percent, not per token
        now = time.monotonic()
        changed = (occupancy, kv_usage) != (self._occupancy, self._kv_usage)
        if not changed and now - self._observed_at < _OBSERVE_EVERY_S:
            return
        self._occupancy, self._kv_usage, self._observed_at = occupancy, kv_usage, now
        if self._observer is not None:
            self._observer.batch_changed(*occupancy, kv_usage)

    def _kv_share(self) -> float:
        """Of the KV budget, the share running sequences hold (as the scheduler counts it); the
        runner's own figure where each sequence has memory of its own."""
        budget = self._runner.kv_tokens
        if not budget:
            return self._runner.kv_usage()
        held = sum(s.computed for s in self._seqs.values() if s.phase in _HOLDING)
        return min(1.0, held / budget)

    def _requests(self) -> tuple[int, int]:
        """Requests running (one of their choices holds a slot: prefilling or decoding) and
        waiting (queued, preempted, or not started yet), each once whatever its `n`: vLLM's
        `num_requests_running` and `num_requests_waiting`."""
        seqs = self._seqs.values()
        running = {s.arrival for s in seqs if s.phase in _HOLDING}
        held = {s.arrival for s in seqs} - running
        return len(running), len(held) + self._inbox.waiting()
