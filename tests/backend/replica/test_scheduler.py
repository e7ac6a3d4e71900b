"""The scheduler as plain data (as vLLM's tests/v1/core/test_scheduler.py drives its own): no
runner, no model, no thread. Each test states the sequences and the limits, and reads the plan."""

from __future__ import annotations

from dataclasses import replace

from backend.replica.scheduler import (
    GROWTH_TOKENS,
    Chunk,
    Limits,
    Phase,
    SeqState,
    StepPlan,
    schedule,
)

LIMITS = Limits(slots=4, token_budget=64)


def waiting(seq_id: int, tokens: int, **kw: object) -> SeqState:
    return SeqState(seq_id, arrival=seq_id, phase=Phase.WAITING, tokens=tokens, **kw)  # type: ignore[arg-type]


def decoding(seq_id: int, tokens: int = 10) -> SeqState:
    return SeqState(seq_id, seq_id, Phase.DECODING, tokens, computed=tokens)


def prefilling(seq_id: int, tokens: int, computed: int) -> SeqState:
    return SeqState(seq_id, seq_id, Phase.PREFILLING, tokens, computed)


def advance(seqs: list[SeqState], plan: StepPlan) -> list[SeqState]:
    """What the executor would make of the plan (every chunk computed, nothing ends)."""
    chunks = {c.seq_id: c.tokens for c in plan.prefill}
    forked = {child for _, child in plan.fork}
    after: list[SeqState] = []
    for seq in seqs:
        if seq.seq_id in plan.preempt:
            seq = replace(seq, phase=Phase.PREEMPTED, computed=0)
        elif seq.seq_id in forked:
            seq = replace(seq, phase=Phase.DECODING, computed=seq.tokens, parent=None)
        elif seq.seq_id in plan.decode:
            seq = replace(seq, computed=seq.computed + 1, tokens=seq.tokens + 1)
        elif seq.seq_id in chunks:
            computed = seq.computed + chunks[seq.seq_id]
            done = computed == seq.tokens
            seq = replace(seq, phase=Phase.DECODING if done else Phase.PREFILLING)
            seq = replace(seq, computed=computed)
        after.append(seq)
    return after


def test_every_running_sequence_decodes_and_prompts_fill_the_rest_of_the_budget() -> None:
    seqs = [decoding(0), decoding(1), waiting(2, 100)]
    plan = schedule(seqs, LIMITS)
    assert plan.decode == (0, 1)
    assert plan.start == (2,) and plan.prefill == (Chunk(2, 62),)
    assert plan.scheduled_tokens == LIMITS.token_budget


def test_the_token_budget_is_honoured_over_a_long_prompt_and_every_step_decodes() -> None:
    seqs = [decoding(0), waiting(1, 300)]
    steps = 0
    while any(s.phase is not Phase.DECODING for s in seqs):
        plan = schedule(seqs, LIMITS)
        assert plan.scheduled_tokens <= LIMITS.token_budget
        assert 0 in plan.decode  # the running stream moves on every step
        seqs = advance(seqs, plan)
        steps += 1
    assert steps == -(-300 // 63)  # 63 prompt tokens per step beside the one decode token


def test_a_step_with_nothing_to_decode_takes_the_idle_budget() -> None:
    limits = replace(LIMITS, idle_token_budget=512)
    alone = schedule([prefilling(0, 2000, 100)], limits)
    assert alone.prefill == (Chunk(0, 512),)  # no stream to stall: the larger chunk
    beside = schedule([decoding(1), prefilling(0, 2000, 100)], limits)
    assert beside.decode == (1,) and beside.prefill == (Chunk(0, 63),)  # a stream runs: capped
    assert schedule([waiting(0, 2000)], limits).prefill == (Chunk(0, 512),)


def test_prompts_already_started_go_first_oldest_first() -> None:
    seqs = [prefilling(1, 100, 40), prefilling(0, 100, 10), waiting(2, 10)]
    plan = schedule(seqs, LIMITS)
    assert plan.prefill == (Chunk(0, 64),)  # the oldest takes the whole budget
    assert plan.start == ()


def test_nothing_starves_the_oldest_waiting_prompt() -> None:
    """New short prompts keep arriving; the long one that came first still completes."""
    seqs = [waiting(0, 500)]
    for step in range(40):
        seqs.append(waiting(100 + step, 8))
        seqs = advance(seqs, schedule(seqs, Limits(slots=64, token_budget=64)))
        if seqs[0].phase is Phase.DECODING:
            break
    assert seqs[0].phase is Phase.DECODING and step < 10


def test_preemption_takes_the_youngest_sequence_holding_memory() -> None:
    seqs = [decoding(0, 40), decoding(1, 40), decoding(2, 40)]
    plan = schedule(seqs, replace(LIMITS, kv_tokens=121))  # 120 held: room for 1 token, not 3
    assert plan.preempt == (2,) and plan.decode == (0, 1)


def test_the_last_sequence_is_never_preempted() -> None:
    plan = schedule([decoding(0, 200)], replace(LIMITS, kv_tokens=100))
    assert plan.preempt == () and plan.decode == (0,)


def test_a_prompt_is_admitted_only_if_its_kv_fits_with_room_to_grow() -> None:
    limits = replace(LIMITS, kv_tokens=200)
    running = [decoding(0, 100)]
    fits = 200 - 100 - 1 - 2 * GROWTH_TOKENS  # held, its next token, a block each to grow
    assert schedule([*running, waiting(1, fits)], limits).start == (1,)
    assert schedule([*running, waiting(1, fits + 1)], limits).start == ()


def test_a_cached_prefix_counts_against_the_budget_once_resumed() -> None:
    limits = replace(LIMITS, kv_tokens=200)
    big = waiting(1, 120, computed=110)  # 110 tokens would resume from the cache
    assert schedule([decoding(0, 100), big], limits).start == ()
    assert schedule([big], limits).prefill == (Chunk(1, 10),)
    # Once it is back, its 120 tokens are live: 80 cells left, too few for 60 + 2 x 16 more.
    assert schedule([big, waiting(2, 60)], limits).start == (1,)


def test_a_sequence_starts_alone_whatever_its_size() -> None:
    plan = schedule([waiting(0, 5000)], replace(LIMITS, kv_tokens=100))
    assert plan.start == (0,) and plan.prefill == (Chunk(0, 64),)


def test_a_preempted_sequence_resumes_before_newer_ones_once_memory_allows() -> None:
    limits = replace(LIMITS, kv_tokens=200)
    back = SeqState(5, 5, Phase.PREEMPTED, tokens=30)
    newer = waiting(9, 30)
    assert schedule([decoding(0, 150), back, newer], limits).start == ()  # no memory yet
    plan = schedule([decoding(0, 20), back, newer], limits)
    assert plan.start == (5, 9)


def test_nothing_is_admitted_in_a_step_that_preempts() -> None:
    seqs = [decoding(0, 40), decoding(1, 40), waiting(2, 1)]
    plan = schedule(seqs, replace(LIMITS, kv_tokens=81))
    assert plan.preempt == (1,) and plan.start == ()


def test_choices_fork_from_their_first_when_its_prompt_completes() -> None:
    first = waiting(0, 20)
    others = [waiting(1, 20, parent=0), waiting(2, 20, parent=0)]
    plan = schedule([first, *others], LIMITS)
    assert plan.start == (0,) and plan.fork == ((0, 1), (0, 2))


def test_choices_wait_while_their_first_prompt_is_in_chunks() -> None:
    seqs = [waiting(0, 100), waiting(1, 100, parent=0)]
    plan = schedule(seqs, LIMITS)
    assert plan.start == (0,) and plan.fork == ()
    plan = schedule(advance(seqs, plan), LIMITS)
    assert plan.prefill == (Chunk(0, 36),) and plan.fork == ((0, 1),)


def test_choices_without_a_slot_are_not_forked() -> None:
    seqs = [waiting(0, 20), waiting(1, 20, parent=0), waiting(2, 20, parent=0)]
    assert schedule(seqs, replace(LIMITS, slots=2)).fork == ((0, 1),)


def test_a_runner_that_cannot_fork_prefills_every_choice() -> None:
    seqs = [waiting(0, 20), waiting(1, 20, parent=0)]
    plan = schedule(seqs, replace(LIMITS, can_fork=False))
    assert plan.start == (0, 1) and plan.fork == ()


def test_whole_prompts_only_wait_for_a_step_with_room_unless_first() -> None:
    limits = replace(LIMITS, chunked_prefill=False)
    plan = schedule([decoding(0), waiting(1, 40), waiting(2, 40)], limits)
    assert plan.prefill == (Chunk(1, 40),)  # 1 + 40 + 40 > 64: the second waits
    plan = schedule([waiting(1, 500)], limits)
    assert plan.prefill == (Chunk(1, 500),)  # longer than the budget: alone, in one step


def test_slots_bound_the_sequences_started() -> None:
    plan = schedule([waiting(i, 4) for i in range(6)], LIMITS)
    assert plan.start == (0, 1, 2, 3)
