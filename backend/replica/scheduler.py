"""The step plan: which sequences decode, which prompt chunks prefill, what starts, forks or is
preempted. Data in, data out, as vLLM v1's `Scheduler.schedule` (vllm/v1/core/sched/): no tensor,
runner or thread here, so the policy is tested as plain data.

The policy, in the order `schedule` applies it:
1. Every decoding sequence gets one token. Short of KV cells for them, the youngest sequence
   holding memory is preempted (it releases its KV and is computed again later), never the last.
2. Prompts already being prefilled continue, oldest first, under the step's token budget (decode
   tokens count against it too: vLLM's `max_num_batched_tokens`). A step with no decode token
   has none to stall: it may take the runner's larger idle budget, as long prompts compute
   faster in larger chunks.
3. Sequences waiting for a slot start, preempted ones first, then in arrival order, while slots,
   budget and KV cells last. A prompt starts only if all of it fits in the free KV cells (a
   resumed prefix is live again too), with a block of growth (`GROWTH_TOKENS`) to spare for
   every sequence then holding memory: admission before prefill, and no thrashing of a stream
   preempted again as soon as it is back. A preempted one resumes as soon as memory allows,
   whatever released it (not in the step that preempted: vLLM's rule). A sequence starts alone
   when nothing else holds memory, whatever its size.
4. The other choices of a request wait for its first choice's prompt and are forked from it in
   the step that prompt completes, where the runner can copy KV and slots allow.
Oldest first at every stage is what keeps anything from starving.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

# Cells of growth each sequence holding memory must have to spare before another is admitted
# (vLLM's block size: its sequences take KV a block at a time).
GROWTH_TOKENS = 16


class Phase(enum.Enum):
    WAITING = "waiting"  # no slot yet
    PREFILLING = "prefilling"  # holds a slot, its prompt not all computed
    DECODING = "decoding"
    PREEMPTED = "preempted"  # sent back: its prompt is now what it had computed, to recompute


@dataclass(frozen=True)
class SeqState:
    """What the scheduler knows of one sequence."""

    seq_id: int
    arrival: int  # the order requests came in (a request's choices share it): higher is younger
    phase: Phase
    tokens: int  # tokens it must hold before it decodes: its prompt (+ its output, if preempted)
    computed: int = 0  # tokens the runner holds for it (for a waiting one: what it would resume)
    parent: int | None = None  # the choice it forks from, while that one's prompt is not in


@dataclass(frozen=True)
class Limits:
    """What the runner and the settings allow one step."""

    slots: int  # sequences the runner holds at once
    token_budget: int  # tokens computed per step: decode tokens and prompt chunks together
    idle_token_budget: int | None = None  # a step without decode tokens; None: `token_budget`
    kv_tokens: int | None = None  # KV cells live sequences share; None: a slot holds its own
    chunked_prefill: bool = True  # a prompt may go in over several steps
    can_fork: bool = True  # the runner copies a prefilled prompt's KV to another sequence


@dataclass(frozen=True)
class Chunk:
    """Prompt tokens of one sequence to compute this step (for one started this step, at most
    this many: its cached prefix is only known once the runner resumes it)."""

    seq_id: int
    tokens: int


@dataclass(frozen=True)
class StepPlan:
    """One step. The executor applies it in field order: preempt, start, then one forward pass
    (or one per part, per the runner) of `decode` and `prefill`, then `fork`."""

    preempt: tuple[int, ...] = ()
    start: tuple[int, ...] = ()  # take a slot, resuming from the runner's longest prefix
    decode: tuple[int, ...] = ()
    prefill: tuple[Chunk, ...] = ()
    fork: tuple[tuple[int, int], ...] = ()  # (parent, child): once the parent's prompt is in

    @property
    def scheduled_tokens(self) -> int:
        """Tokens this step computes (for chunks of sequences started in it, at most)."""
        return len(self.decode) + sum(chunk.tokens for chunk in self.prefill)

    def is_empty(self) -> bool:
        return not (self.preempt or self.start or self.decode or self.prefill or self.fork)


@dataclass
class _Budget:
    """What is left of the step's limits while the plan fills."""

    tokens: int
    slots: int
    kv_free: int | None
    reserved: int = 0  # KV cells promised to prompts already started (their chunks to come)
    preempt: list[int] = field(default_factory=list)

    def kv_room(self) -> int | None:
        return None if self.kv_free is None else self.kv_free - self.reserved


def schedule(seqs: list[SeqState], limits: Limits) -> StepPlan:
    """The plan of the next step for `seqs` (every sequence the loop holds, any phase)."""
    holders = [s for s in seqs if s.phase in (Phase.PREFILLING, Phase.DECODING)]
    used = sum(s.computed for s in holders)
    budget = _Budget(
        tokens=limits.token_budget,
        slots=limits.slots - len(holders),
        kv_free=None if limits.kv_tokens is None else limits.kv_tokens - used,
    )
    holders = _preempt_for_decodes(holders, budget)
    decode = [s for s in holders if s.phase is Phase.DECODING]
    if not decode and limits.idle_token_budget is not None:
        budget.tokens = max(budget.tokens, limits.idle_token_budget)
    budget.tokens -= len(decode)
    prefilling = sorted((s for s in holders if s.phase is Phase.PREFILLING), key=_age)
    budget.reserved = sum(s.tokens - s.computed for s in prefilling)
    chunks = _continue_prefills(prefilling, budget, limits)
    completing = [c.seq_id for c, s in zip(chunks, prefilling, strict=False) if _completes(c, s)]
    started, new_chunks, forks = _start_waiting(seqs, budget, limits, len(holders), completing)
    return StepPlan(
        preempt=tuple(budget.preempt),
        start=tuple(s.seq_id for s in started),
        decode=tuple(s.seq_id for s in decode),
        prefill=(*chunks, *new_chunks),
        fork=tuple(forks),
    )


def _age(seq: SeqState) -> tuple[int, int]:
    return seq.arrival, seq.seq_id


def _completes(chunk: Chunk, seq: SeqState) -> bool:
    return seq.computed + chunk.tokens == seq.tokens


def _preempt_for_decodes(holders: list[SeqState], budget: _Budget) -> list[SeqState]:
    """Preempt the youngest holders until every decoding one has a cell for its token."""
    kept = sorted(holders, key=_age)
    while budget.kv_free is not None and len(kept) > 1:
        decoding = sum(s.phase is Phase.DECODING for s in kept)
        if budget.kv_free >= decoding:
            break
        victim = kept.pop()
        budget.kv_free += victim.computed
        budget.slots += 1
        budget.preempt.append(victim.seq_id)
    if budget.kv_free is not None:
        budget.kv_free -= sum(s.phase is Phase.DECODING for s in kept)
    return kept


def _continue_prefills(prefilling: list[SeqState], budget: _Budget, limits: Limits) -> list[Chunk]:
    chunks: list[Chunk] = []
    for seq in prefilling:
        left = seq.tokens - seq.computed
        take = _chunk_size(left, budget, limits, first=not chunks)
        if take == 0:
            break  # the oldest goes first: nothing younger overtakes it
        chunks.append(Chunk(seq.seq_id, take))
        budget.tokens -= take
        budget.reserved -= take
        if budget.kv_free is not None:
            budget.kv_free -= take
    return chunks


def _chunk_size(left: int, budget: _Budget, limits: Limits, first: bool) -> int:
    """Tokens of a prompt with `left` to compute that this step takes: as many as the budget
    allows, or for a runner that takes prompts whole, all of them or none (a prompt longer than
    the whole budget goes alone, as the step's first)."""
    if limits.chunked_prefill:
        return max(0, min(left, budget.tokens))
    fits = left <= budget.tokens or (first and budget.tokens > 0)
    return left if fits else 0


def _start_waiting(
    seqs: list[SeqState],
    budget: _Budget,
    limits: Limits,
    holding: int,
    completing: list[int],
) -> tuple[list[SeqState], list[Chunk], list[tuple[int, int]]]:
    """Sequences that take a slot this step, their first chunks, and the forks of the choices
    waiting on a prompt that completes in this plan (`completing`: those already started)."""
    waiting = sorted(
        (s for s in seqs if s.phase in (Phase.WAITING, Phase.PREEMPTED)),
        key=lambda s: (s.phase is not Phase.PREEMPTED, *_age(s)),
    )
    children: dict[int, list[SeqState]] = {}
    for seq in waiting:
        if seq.parent is not None and limits.can_fork:
            children.setdefault(seq.parent, []).append(seq)
    started: list[SeqState] = []
    chunks: list[Chunk] = []
    for seq in waiting:
        if seq.parent is not None and limits.can_fork:
            continue  # forked from its parent's prompt
        if budget.slots <= 0 or budget.tokens <= 0:
            break
        left = seq.tokens - seq.computed
        room = budget.kv_room()
        alone = not holding and not started
        short = room is not None and seq.tokens + GROWTH_TOKENS * (holding + 1) > room
        if not alone and (short or (room is not None and budget.preempt)):
            break  # admission: its prompt must fit before any of it is computed
        take = _chunk_size(left, budget, limits, first=alone or not chunks)
        if take == 0:
            break
        started.append(seq)
        chunks.append(Chunk(seq.seq_id, take))
        budget.slots -= 1
        budget.tokens -= take
        budget.reserved += left - take
        holding += 1
        if budget.kv_free is not None:
            budget.kv_free -= seq.computed + take  # a resumed prefix is live again
        if take == left:
            completing.append(seq.seq_id)
    return started, chunks, _forks(completing, children, budget)


def _forks(
    completing: list[int], children: dict[int, list[SeqState]], budget: _Budget
) -> list[tuple[int, int]]:
    forks: list[tuple[int, int]] = []
    for parent in completing:
        for child in children.get(parent, []):
            room = budget.kv_room()
            if budget.slots <= 0 or (room is not None and child.tokens > room):
                return forks  # the others wait, and are prefilled as any prompt later
            forks.append((parent, child.seq_id))
            budget.slots -= 1
            if budget.kv_free is not None:
                budget.kv_free -= child.tokens
    return forks
