"""The continuous-batching loop, over a fake runner that records every step."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import threading
from collections.abc import Callable
from dataclasses import replace
from typing import ClassVar

import pytest
import torch

from backend.engines.prefix_store import common_prefix
from backend.errors import EngineError
from backend.generation import SamplingParams
from backend.replica import loop as batch_loop
from backend.replica import sampler
from backend.replica.loop import ContinuousBatcher
from backend.replica.runner import SequencesFailed
from backend.replica.sampler import sample_next_tokens

VOCAB = 50
EOS = 0


class ByteTokenizer:
    """Token id n decodes to chr(n + 64): 1 -> 'A'."""

    def decode(self, token_ids: list[int], skip_special_tokens: bool = True) -> str:
        return "".join(chr(t + 64) for t in token_ids if t != EOS)


class CountingRunner:
    """Each sequence emits prompt[-1]+1, +2, ... then EOS after `length` tokens; records steps."""

    chunked_prefill = False
    mixed_batch = False
    prefix_caching = False
    kv_tokens: int | None = None

    def __init__(self, length: int = 5, fail_on_step: int | None = None) -> None:
        self.capacity = 8
        self.steps: list[tuple[str, int]] = []  # ("prefill", prompt tokens) or ("decode", batch)
        self.length = length
        self.fail_on_step = fail_on_step
        self.batch_sizes: list[int] = []
        self.released: list[int] = []
        self.state: dict[int, tuple[int, int]] = {}  # seq id -> (last token, tokens emitted)
        self.lock = threading.Lock()
        self.step_delay_s = 0.0
        self.can_fork = True
        self.forked: list[tuple[int, int]] = []

    def _logits(self, token: int) -> torch.Tensor:
        logits = torch.full((VOCAB,), -1e9)
        logits[token] = 0.0
        return logits

    def _next(self, seq_id: int) -> torch.Tensor:
        last, emitted = self.state[seq_id]
        token = EOS if emitted >= self.length else last + 1
        self.state[seq_id] = (token, emitted + 1)
        return self._logits(token)

    def lookup(self, prompt_ids: list[int]) -> int:
        raise AssertionError("the loop looked up a prefix on a runner without prefix caching")

    def resume(self, seq_id: int, prompt_ids: list[int]) -> int:
        raise AssertionError("the loop resumed on a runner without prefix caching")

    def prefill(self, seq_id: int, prompt_ids: list[int]) -> torch.Tensor:
        self.steps.append(("prefill", len(prompt_ids)))
        self.state[seq_id] = (prompt_ids[-1], 0)
        return self._next(seq_id)

    def decode(self, seq_ids: list[int], token_ids: list[int]) -> torch.Tensor:
        if self.fail_on_step is not None and len(self.batch_sizes) == self.fail_on_step:
            raise RuntimeError("device lost")
        self.batch_sizes.append(len(seq_ids))
        self.steps.append(("decode", len(seq_ids)))
        threading.Event().wait(self.step_delay_s)
        return torch.stack([self._next(s) for s in seq_ids])

    def fork(self, parent_id: int, child_id: int) -> bool:
        """The child continues from the parent's state, as a copy of its KV would."""
        if not self.can_fork:
            return False
        self.forked.append((parent_id, child_id))
        self.state[child_id] = self.state[parent_id]
        return True

    def release(self, seq_id: int) -> None:
        self.released.append(seq_id)
        self.state.pop(seq_id, None)

    def reset(self) -> None:
        self.state.clear()

    def kv_usage(self) -> float:
        return len(self.state) / 10  # a cache of ten sequences' room


class ChunkingRunner(CountingRunner):
    """Accepts a prompt in chunks; only the last chunk's logits count."""

    chunked_prefill = True


class PrefixRunner(ChunkingRunner):
    """Remembers released sequences' tokens and resumes a prompt from the longest shared prefix
    (as the real runners do), recording what it resumed."""

    prefix_caching = True

    def __init__(self, length: int = 5) -> None:
        super().__init__(length)
        self.held: dict[int, list[int]] = {}  # seq id -> tokens its KV holds
        self.parked: list[list[int]] = []
        self.resumed: list[int] = []

    def lookup(self, prompt_ids: list[int]) -> int:
        shared = max((common_prefix(p, prompt_ids) for p in self.parked), default=0)
        return min(shared, len(prompt_ids) - 1)

    def resume(self, seq_id: int, prompt_ids: list[int]) -> int:
        keep = self.lookup(prompt_ids)
        self.held[seq_id] = prompt_ids[:keep]
        self.resumed.append(keep)
        return keep

    def prefill(self, seq_id: int, prompt_ids: list[int]) -> torch.Tensor:
        self.held.setdefault(seq_id, []).extend(prompt_ids)
        return super().prefill(seq_id, prompt_ids)

    def decode(self, seq_ids: list[int], token_ids: list[int]) -> torch.Tensor:
        for seq_id, token in zip(seq_ids, token_ids, strict=True):
            self.held[seq_id].append(token)
        return super().decode(seq_ids, token_ids)

    def release(self, seq_id: int) -> None:
        self.parked.append(self.held.pop(seq_id, []))
        super().release(seq_id)


def make_batcher(
    runner: CountingRunner,
    max_batch_size: int = 8,
    token_budget: int = 512,
    stream_interval_s: float = 0.0,
    stream_updates_per_s: float = 0.0,
) -> ContinuousBatcher:
    runner.capacity = max_batch_size
    batcher = ContinuousBatcher(
        runner,
        ByteTokenizer(),
        frozenset({EOS}),
        token_budget=token_budget,
        stream_interval_s=stream_interval_s,
        stream_updates_per_s=stream_updates_per_s,
    )
    batcher.start()
    return batcher


GREEDY = SamplingParams(max_tokens=100, temperature=0.0)


async def collect(batcher: ContinuousBatcher, prompt: list[int], params: SamplingParams = GREEDY):
    return [d async for d in batcher.stream(prompt, params)]


async def test_one_stream_gets_its_tokens_and_stop_on_eos() -> None:
    batcher = make_batcher(CountingRunner(length=3))
    deltas = await collect(batcher, [1])
    assert "".join(d.text for d in deltas) == "BCD"
    assert deltas[-1].finish_reason == "stop"
    assert sum(d.tokens for d in deltas) == 4  # three letters and the end-of-sequence token
    batcher.shutdown()


async def test_concurrent_streams_share_decode_steps() -> None:
    runner = CountingRunner(length=20)
    runner.step_delay_s = 0.005
    batcher = make_batcher(runner)
    results = await asyncio.gather(*(collect(batcher, [i]) for i in range(1, 7)))
    for i, deltas in enumerate(results, start=1):
        assert "".join(d.text for d in deltas) == "".join(chr(64 + i + k) for k in range(1, 21))
    assert max(runner.batch_sizes) == 6
    assert batcher.stats.mean_batch_size > 3
    batcher.shutdown()


async def test_batch_never_exceeds_max_and_waiting_requests_join_later() -> None:
    runner = CountingRunner(length=4)
    batcher = make_batcher(runner, max_batch_size=2)
    results = await asyncio.gather(*(collect(batcher, [1]) for _ in range(5)))
    assert all("".join(d.text for d in r) == "BCDE" for r in results)
    assert max(runner.batch_sizes) == 2
    batcher.shutdown()


async def test_max_tokens_finishes_with_length() -> None:
    batcher = make_batcher(CountingRunner(length=30))
    deltas = await collect(batcher, [1], SamplingParams(max_tokens=4, temperature=0.0))
    assert "".join(d.text for d in deltas) == "BCDE"
    assert deltas[-1].finish_reason == "length"
    batcher.shutdown()


async def test_stop_sequence_ends_the_stream_without_the_stop_text() -> None:
    batcher = make_batcher(CountingRunner(length=30))
    params = SamplingParams(max_tokens=50, temperature=0.0, stop=("EF",))
    deltas = await collect(batcher, [1], params)
    assert "".join(d.text for d in deltas) == "BCD"
    assert deltas[-1].finish_reason == "stop"
    batcher.shutdown()


async def test_leaving_a_stream_frees_its_slot_at_the_next_step() -> None:
    runner = CountingRunner(length=1000)
    runner.step_delay_s = 0.002
    batcher = make_batcher(runner)
    stream = batcher.stream([1], GREEDY)
    await anext(stream)
    await eventually(lambda: batcher.occupancy() == (1, 0))
    await stream.aclose()
    await eventually(lambda: batcher.occupancy() == (0, 0))
    assert runner.released == [0]
    assert runner.state == {}
    batcher.shutdown()


async def test_failed_step_errors_the_streams_and_the_loop_keeps_serving() -> None:
    runner = CountingRunner(length=10, fail_on_step=2)
    batcher = make_batcher(runner)
    with pytest.raises(EngineError, match="device lost"):
        await collect(batcher, [1])
    runner.fail_on_step = None
    assert "".join(d.text for d in await collect(batcher, [1])) == "BCDEFGHIJK"
    assert batcher.is_alive()
    batcher.shutdown()
    assert not batcher.is_alive()


async def test_ignore_eos_generates_to_max_tokens() -> None:
    batcher = make_batcher(CountingRunner(length=2))
    params = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
    deltas = await collect(batcher, [1], params)
    assert sum(d.tokens for d in deltas) == 6 and deltas[-1].finish_reason == "length"
    batcher.shutdown()


class RecordingObserver:
    """Every (running, waiting) the loop reports, and the KV usage with it."""

    def __init__(self) -> None:
        self.seen: list[tuple[int, int]] = []
        self.kv_usage: list[float] = []
        self.preemptions = 0

    def batch_changed(self, running: int, waiting: int, kv_usage: float) -> None:
        self.seen.append((running, waiting))
        self.kv_usage.append(kv_usage)

    def preempted(self) -> None:
        self.preemptions += 1


async def test_occupancy_reports_running_and_waiting_streams() -> None:
    runner = CountingRunner(length=30)
    runner.step_delay_s = 0.01
    observer = RecordingObserver()
    runner.capacity = 2
    batcher = ContinuousBatcher(runner, ByteTokenizer(), frozenset({EOS}), observer=observer)
    batcher.start()
    await asyncio.gather(*(collect(batcher, [1]) for _ in range(3)))
    await asyncio.sleep(0.05)
    assert (2, 1) in observer.seen  # a full batch and one request queued behind it
    assert observer.seen[-1] == (0, 0) == batcher.occupancy()
    assert 0.2 in observer.kv_usage and observer.kv_usage[-1] == 0.0  # the runner's own figure
    batcher.shutdown()


async def eventually(condition: Callable[[], bool], timeout_s: float = 2.0) -> None:
    for _ in range(int(timeout_s / 0.01)):
        if condition():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("condition not met in time")


class FailingTokenizer(ByteTokenizer):
    """Decoding one particular token raises, as a broken tokenizer would inside the loop."""

    def decode(self, token_ids: list[int], skip_special_tokens: bool = True) -> str:
        if 9 in token_ids:
            raise ValueError("cannot decode 9")
        return super().decode(token_ids, skip_special_tokens)


async def test_text_that_cannot_be_made_fails_its_stream_alone() -> None:
    runner = CountingRunner(length=20)
    runner.step_delay_s = 0.01
    runner.capacity = 8
    batcher = ContinuousBatcher(runner, FailingTokenizer(), frozenset({EOS}))
    batcher.start()
    other = asyncio.ensure_future(collect(batcher, [10]))
    with pytest.raises(EngineError, match="cannot decode 9"):  # 6, 7, 8, then 9 breaks it
        await asyncio.wait_for(collect(batcher, [5]), 10)
    # Its first token, out of prefill, breaks it: it still gets its error.
    with pytest.raises(EngineError, match="cannot decode 9"):
        await asyncio.wait_for(collect(batcher, [8]), 10)
    assert "".join(d.text for d in await other) == "".join(chr(64 + t) for t in range(11, 31))
    await eventually(lambda: runner.state == {})  # all released (just after their last delta)
    assert batcher.is_alive()
    batcher.shutdown()


async def test_shutdown_fails_running_and_queued_requests() -> None:
    runner = CountingRunner(length=10_000)
    runner.step_delay_s = 0.01
    batcher = make_batcher(runner, max_batch_size=1)
    running = asyncio.create_task(collect(batcher, [1]))
    queued = asyncio.create_task(collect(batcher, [2]))
    await eventually(lambda: batcher.occupancy() == (1, 1))
    await asyncio.to_thread(batcher.shutdown)
    for task in (running, queued):
        with pytest.raises(EngineError, match="shutting down"):
            await asyncio.wait_for(task, 5)


async def test_a_slow_reader_gets_the_tokens_it_missed_as_one_item() -> None:
    runner = CountingRunner(length=30)
    batcher = make_batcher(runner)
    items = []
    async for delta in batcher.stream([1], GREEDY):
        items.append(delta)
        await asyncio.sleep(0.05)  # the loop runs ahead meanwhile
    assert "".join(d.text for d in items) == "".join(chr(64 + t) for t in range(2, 32))
    assert sum(d.tokens for d in items) == 31  # 30 letters and the end-of-sequence token
    assert len(items) < 31 and items[-1].finish_reason == "stop"
    batcher.shutdown()


async def test_after_the_first_text_a_stream_sends_at_most_once_per_interval() -> None:
    runner = CountingRunner(length=40)
    runner.step_delay_s = 0.005  # 40 tokens take >= 0.2 s: about 4 intervals
    batcher = make_batcher(runner, stream_interval_s=0.05)
    items = [delta async for delta in batcher.stream([1], GREEDY)]
    assert "".join(d.text for d in items) == "".join(chr(64 + t) for t in range(2, 42))
    assert sum(d.tokens for d in items) == 41
    assert items[0].tokens == 1  # the first token is not held back
    # An item goes as its last token is sampled (on the loop thread, whatever the reader's delay).
    sent = [d.token_times[-1] for d in items]
    gaps = [later - earlier for earlier, later in itertools.pairwise(sent)]
    assert len(items) < 41 and min(gaps[:-1]) >= 0.045  # the last may end an interval early
    batcher.shutdown()


async def test_with_many_streams_each_sends_less_often() -> None:
    """4 streams within 20 items/s together: each sends at most every 0.2 s."""
    runner = CountingRunner(length=40)
    runner.step_delay_s = 0.015  # 40 tokens take >= 0.6 s: 3 intervals or more
    batcher = make_batcher(runner, stream_interval_s=0.0, stream_updates_per_s=20)

    async def timed() -> list[tuple[float, int]]:
        """When each item went (its last token), and how many streams ran when it came."""
        stream = batcher.stream([1], GREEDY)
        return [(d.token_times[-1], batcher.occupancy()[0]) async for d in stream]

    streams = await asyncio.gather(*(timed() for _ in range(4)))
    for items in streams:
        # While all 4 run; the last item, the end, goes at once.
        gaps = [b[0] - a[0] for a, b in itertools.pairwise(items[:-1]) if a[1] == 4]
        assert gaps and min(gaps) >= 0.19
    batcher.shutdown()


async def test_without_an_interval_every_token_is_its_own_item() -> None:
    runner = CountingRunner(length=10)
    runner.step_delay_s = 0.02  # a reader that keeps up, even on a busy machine
    batcher = make_batcher(runner)
    items = await collect(batcher, [1])
    assert [d.tokens for d in items] == [1] * 11
    batcher.shutdown()


async def until_decoding(runner: CountingRunner) -> None:
    await eventually(lambda: ("decode", 1) in runner.steps)


async def test_a_long_prompt_is_prefilled_in_chunks_between_decode_steps() -> None:
    runner = ChunkingRunner(length=20)
    runner.step_delay_s = 0.002
    batcher = make_batcher(runner, token_budget=5)  # the running stream's token, and 4
    running = asyncio.ensure_future(collect(batcher, [1]))
    await until_decoding(runner)
    long_prompt = [1] * 9 + [20]
    deltas = await collect(batcher, long_prompt)
    assert "".join(d.text for d in deltas).startswith("UVW")  # 21, 22, 23 after the last chunk
    first = runner.steps.index(("prefill", 4), 1)
    assert runner.steps[first : first + 5] == [
        ("prefill", 4),
        ("decode", 1),  # the running stream is not frozen while the long prompt goes in
        ("prefill", 4),
        ("decode", 1),
        ("prefill", 2),
    ]
    await running
    batcher.shutdown()


async def test_whole_prompts_are_admitted_up_to_the_budget_per_step() -> None:
    runner = CountingRunner(length=30)
    runner.step_delay_s = 0.002
    batcher = make_batcher(runner, token_budget=6)
    running = asyncio.ensure_future(collect(batcher, [1]))
    await until_decoding(runner)
    before = len(runner.steps)
    await asyncio.gather(*(collect(batcher, [1, 2, 3, 4]) for _ in range(3)))
    prefills_between_decodes = [
        len(list(group))
        for kind, group in itertools.groupby(runner.steps[before:], key=lambda s: s[0])
        if kind == "prefill"
    ]
    assert prefills_between_decodes == [1, 1, 1]  # 1 + 4 + 4 > 6: one prompt per step
    await running
    batcher.shutdown()


async def test_a_prompt_longer_than_the_budget_still_goes_in_whole() -> None:
    runner = CountingRunner(length=2)
    batcher = make_batcher(runner, token_budget=3)
    deltas = await collect(batcher, [1, 2, 3, 4, 5])
    assert "".join(d.text for d in deltas) == "FG"
    assert runner.steps[0] == ("prefill", 5)
    batcher.shutdown()


async def test_a_follow_up_prompt_prefills_only_what_the_runner_does_not_hold() -> None:
    runner = PrefixRunner(length=3)
    batcher = make_batcher(runner, token_budget=4)
    first = await collect(batcher, [1, 2, 3])
    assert first[0].cached_tokens == 0
    # The runner holds 1 2 3 and the reply's tokens it was fed, 4 5 6 (never the last sampled
    # one). The next turn's prompt re-tokenizes the reply differently at its end: 1 2 3 4 5 9 9.
    follow_up = [1, 2, 3, 4, 5, 9, 9]
    deltas = await collect(batcher, follow_up)
    assert runner.resumed == [0, 5]
    assert deltas[0].cached_tokens == 5 and sum(d.cached_tokens for d in deltas) == 5
    assert runner.steps.count(("prefill", 2)) == 1  # only the two new tokens were computed
    assert batcher.stats.prompt_tokens == 10 and batcher.stats.cached_tokens == 5
    batcher.shutdown()


async def test_a_prompt_the_runner_holds_whole_still_computes_its_last_token() -> None:
    runner = PrefixRunner(length=2)
    batcher = make_batcher(runner)
    await collect(batcher, [1, 2, 3, 4])
    before = len(runner.steps)
    deltas = await collect(batcher, [1, 2, 3, 4])  # "regenerate": the same prompt again
    assert runner.resumed[-1] == 3 and deltas[0].cached_tokens == 3
    assert runner.steps[before] == ("prefill", 1)  # the last token, for its logits
    batcher.shutdown()


async def test_the_prefill_budget_charges_only_computed_tokens() -> None:
    runner = PrefixRunner(length=10)
    batcher = make_batcher(runner, token_budget=4)
    await collect(batcher, [1] * 12 + [2])
    runner.step_delay_s = 0.05  # both follow-ups arrive during one decode step
    before = len(runner.steps)
    running = asyncio.ensure_future(collect(batcher, [7]))
    await eventually(lambda: ("decode", 1) in runner.steps[before:])
    before = len(runner.steps)
    # Two follow-ups of the long prompt: each computes 1 token, so both fit one step's budget
    # of 4 with the running stream's token, which their whole 14-token prompts never would.
    await asyncio.gather(*(collect(batcher, [1] * 12 + [2, 5 + i]) for i in range(2)))
    assert runner.resumed[2:] == [13, 13]
    kinds = [kind for kind, _ in runner.steps[before:]]
    first = kinds.index("prefill")
    assert kinds[first : first + 3] == ["prefill", "prefill", "decode"]
    await running
    batcher.shutdown()


class OneSequenceFails(CountingRunner):
    """At its fourth decode step, refuses one sequence (as a runner does for a sequence at its
    window) and touches none."""

    def __init__(self, victim_prompt: int) -> None:
        super().__init__(length=12)
        self.victim_prompt = victim_prompt
        self.victim: int | None = None

    def prefill(self, seq_id: int, prompt_ids: list[int]) -> torch.Tensor:
        if prompt_ids[-1] == self.victim_prompt:
            self.victim = seq_id
        return super().prefill(seq_id, prompt_ids)

    def decode(self, seq_ids: list[int], token_ids: list[int]) -> torch.Tensor:
        if len(self.batch_sizes) == 3 and self.victim in seq_ids:
            self.batch_sizes.append(0)
            raise SequencesFailed("at its window", [self.victim])
        return super().decode(seq_ids, token_ids)


async def test_a_request_submitted_as_the_loop_stops_is_refused_not_lost(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    batcher = make_batcher(CountingRunner())

    class StoppedMeanwhile(batch_loop.Sequence):
        """The loop stops after `stream` checked that it runs, before the request is queued."""

        def __init__(self, *args: object) -> None:
            batcher.shutdown()
            super().__init__(*args)  # type: ignore[arg-type]

    monkeypatch.setattr(batch_loop, "Sequence", StoppedMeanwhile)
    with pytest.raises(EngineError, match="not running"):
        await asyncio.wait_for(collect(batcher, [1]), 5)


async def test_cancelled_requests_waiting_for_a_slot_are_not_counted_waiting() -> None:
    runner = CountingRunner(length=45)  # runs for seconds, within the vocabulary
    runner.step_delay_s = 0.05
    observer = RecordingObserver()
    runner.capacity = 1
    batcher = ContinuousBatcher(runner, ByteTokenizer(), frozenset({EOS}), observer=observer)
    batcher.start()
    running = asyncio.ensure_future(collect(batcher, [1]))
    queued = [batcher.stream([2], GREEDY) for _ in range(3)]
    waiting = [asyncio.ensure_future(anext(stream)) for stream in queued]
    await eventually(lambda: batcher.occupancy() == (1, 3))
    for task, stream in zip(waiting, queued, strict=True):
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await stream.aclose()
    await eventually(lambda: batcher.occupancy() == (1, 0))
    running.cancel()
    batcher.shutdown()


async def test_a_sequence_the_runner_refuses_fails_alone() -> None:
    runner = OneSequenceFails(victim_prompt=20)
    runner.step_delay_s = 0.01
    batcher = make_batcher(runner)
    others = [asyncio.ensure_future(collect(batcher, [p])) for p in (1, 2)]
    with pytest.raises(EngineError, match="at its window"):
        await collect(batcher, [20])
    for deltas in await asyncio.gather(*others):
        assert sum(d.tokens for d in deltas) == 13 and deltas[-1].finish_reason == "stop"
    assert runner.victim in runner.released
    batcher.shutdown()


async def test_a_row_the_sampler_cannot_take_fails_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    calls_with_13 = []

    def refuse_seed_13(logits: torch.Tensor, params: list[SamplingParams], gens: list) -> list:
        if any(p.seed == 13 for p in params):
            calls_with_13.append(len(params))
            if len(calls_with_13) > 1:  # its prefill's token passes; its decode rows do not
                raise ValueError("bad row")
        return sample_next_tokens(logits, params, gens)

    runner = CountingRunner(length=12)
    runner.step_delay_s = 0.01
    batcher = make_batcher(runner)
    monkeypatch.setattr(sampler, "sample_next_tokens", refuse_seed_13)
    fine = [asyncio.ensure_future(collect(batcher, [p])) for p in (1, 2)]
    await eventually(lambda: any(kind == "decode" for kind, _ in runner.steps))
    with pytest.raises(EngineError, match="while sampling: bad row"):
        await collect(batcher, [5], SamplingParams(max_tokens=100, temperature=0.0, seed=13))
    for deltas in await asyncio.gather(*fine):
        assert sum(d.tokens for d in deltas) == 13
    assert calls_with_13[:3] == [1, 3, 1]  # its first token, the batch of three, its row alone
    batcher.shutdown()


class ShortOfMemory(PrefixRunner):
    """KV cells for 60 tokens: two streams of 21 fit, a third joining them runs out, and the
    loop's scheduler preempts the youngest (it admits a prompt with 16 cells of growth to spare
    for each sequence: `scheduler.GROWTH_TOKENS`)."""

    kv_tokens = 60

    def __init__(self) -> None:
        super().__init__(length=20)
        self.asked: dict[int, int] = {}  # seq id -> its request's own prompt length

    def resume(self, seq_id: int, prompt_ids: list[int]) -> int:
        self.asked.setdefault(seq_id, len(prompt_ids))
        return super().resume(seq_id, prompt_ids)

    def prefill(self, seq_id: int, prompt_ids: list[int]) -> torch.Tensor:
        """As a model would: what comes next depends on the tokens so far, so a prompt that
        carries earlier output goes on where that output stopped."""
        self.held.setdefault(seq_id, []).extend(prompt_ids)
        self.steps.append(("prefill", len(prompt_ids)))
        self.state[seq_id] = (prompt_ids[-1], len(self.held[seq_id]) - self.asked[seq_id])
        return self._next(seq_id)


async def test_a_preempted_stream_is_computed_again_and_says_the_same() -> None:
    alone_runner = PrefixRunner(length=20)
    alone = make_batcher(alone_runner)
    expected = ["".join(d.text for d in await collect(alone, [p])) for p in (1, 5, 9)]
    alone.shutdown()
    runner = ShortOfMemory()
    runner.step_delay_s = 0.01
    observer = RecordingObserver()
    runner.capacity = 8
    batcher = ContinuousBatcher(runner, ByteTokenizer(), frozenset({EOS}), observer=observer)
    batcher.start()
    # All three start together; the youngest, from 9, is preempted when they outgrow the cells.
    replies = await asyncio.gather(*(collect(batcher, [p]) for p in (1, 5, 9)))
    texts = ["".join(d.text for d in reply) for reply in replies]
    third = replies[2]
    assert texts == expected
    assert batcher.stats.preemptions == 1 == observer.preemptions
    # Computed again from its prompt and the tokens it had sampled: what it held came back
    # from the runner's cache (more than its one-token prompt), the rest is computed.
    assert runner.resumed[-1] > 1
    assert sum(d.tokens for d in third) == 21 and sum(d.cached_tokens for d in third) == 0
    assert batcher.stats.prompt_tokens == 3  # each request's prompt once, preemption or not
    batcher.shutdown()


async def test_logits_processors_change_only_the_rows_that_asked() -> None:
    batcher = make_batcher(CountingRunner(length=4))
    biased = SamplingParams(max_tokens=4, temperature=0.0, logit_bias=((5, 2e9),))
    plain, pushed = await asyncio.gather(collect(batcher, [1]), collect(batcher, [1], biased))
    assert "".join(d.text for d in plain) == "BCDE"  # what the runner says
    assert "".join(d.text for d in pushed) == "EEEE"  # token 5, every step
    batcher.shutdown()


async def test_log_probabilities_come_one_per_token_with_their_alternatives() -> None:
    batcher = make_batcher(CountingRunner(length=3), stream_interval_s=0.05)
    params = SamplingParams(max_tokens=10, temperature=0.0, logprobs=2)
    deltas = await collect(batcher, [1], params)
    entries = [entry for d in deltas for entry in d.logprobs]
    assert len(entries) == sum(d.tokens for d in deltas) == 4  # B, C, D and the end
    assert [e.token for e in entries[:3]] == ["B", "C", "D"]
    assert all(e.logprob == 0.0 and len(e.top) == 2 and e.top[0][0] == e.token for e in entries)
    unasked = await collect(batcher, [1])
    assert all(d.logprobs == () for d in unasked)
    batcher.shutdown()


class UniformRunner(CountingRunner):
    """Every token equally likely at every step: what is sampled depends on the seed alone."""

    def _logits(self, token: int) -> torch.Tensor:
        return torch.zeros(VOCAB)


def texts_by_choice(deltas: list) -> dict[int, str]:
    texts: dict[int, str] = {}
    for delta in deltas:
        texts[delta.index] = texts.get(delta.index, "") + delta.text
    return texts


def prefills(runner: CountingRunner) -> int:
    return sum(kind == "prefill" for kind, _ in runner.steps)


async def test_n_choices_start_from_one_prefill_and_decode_together() -> None:
    runner = CountingRunner(length=3)
    batcher = make_batcher(runner)
    deltas = await collect(batcher, [1, 2, 3], replace(GREEDY, n=3))
    assert texts_by_choice(deltas) == {0: "DEF", 1: "DEF", 2: "DEF"}
    assert sorted(d.index for d in deltas if d.finish_reason) == [0, 1, 2]
    assert prefills(runner) == 1 and len(runner.forked) == batcher.stats.forks == 2
    assert set(runner.batch_sizes) == {3}  # every decode step ran the three choices
    # The prompt's cached tokens are reported once, by the first choice.
    assert sum(d.cached_tokens for d in deltas if d.index > 0) == 0
    batcher.shutdown()


async def test_a_runner_that_cannot_fork_prefills_each_choice() -> None:
    runner = CountingRunner(length=3)
    runner.can_fork = False
    batcher = make_batcher(runner)
    deltas = await collect(batcher, [1, 2, 3], replace(GREEDY, n=3))
    assert texts_by_choice(deltas) == {0: "DEF", 1: "DEF", 2: "DEF"}
    assert prefills(runner) == 3 and batcher.stats.forks == 0
    batcher.shutdown()


async def test_choices_without_a_free_slot_are_prefilled_when_they_get_one() -> None:
    runner = CountingRunner(length=3)
    batcher = make_batcher(runner, max_batch_size=2)
    deltas = await collect(batcher, [1, 2, 3], replace(GREEDY, n=3))
    assert texts_by_choice(deltas) == {0: "DEF", 1: "DEF", 2: "DEF"}
    assert prefills(runner) == 2 and batcher.stats.forks == 1
    batcher.shutdown()


async def test_each_choice_samples_with_the_seed_plus_its_index() -> None:
    batcher = make_batcher(UniformRunner(length=100))
    params = SamplingParams(max_tokens=12, temperature=1.0, seed=10, ignore_eos=True)
    together = texts_by_choice(await collect(batcher, [1], replace(params, n=3)))
    alone = [
        "".join(d.text for d in await collect(batcher, [1], replace(params, seed=10 + i)))
        for i in range(3)
    ]
    assert [together[i] for i in range(3)] == alone
    assert len(set(alone)) == 3  # the seeds differ, so do the choices
    batcher.shutdown()


async def test_leaving_a_request_of_several_choices_frees_all_their_slots() -> None:
    runner = CountingRunner(length=1000)
    runner.step_delay_s = 0.002
    batcher = make_batcher(runner)
    stream = batcher.stream([1], replace(GREEDY, n=3))
    await anext(stream)
    await stream.aclose()
    for _ in range(200):
        if len(runner.released) == 3:
            break
        await asyncio.sleep(0.01)
    assert len(runner.released) == 3 and batcher.occupancy() == (0, 0)
    batcher.shutdown()


async def test_choices_prefilled_each_report_the_cached_prompt_once() -> None:
    runner = PrefixRunner(length=3)
    runner.can_fork = False
    batcher = make_batcher(runner)
    await collect(batcher, [1, 2, 3, 4])  # parked: the next request resumes from it
    deltas = await collect(batcher, [1, 2, 3, 4], replace(GREEDY, n=3))
    assert runner.resumed[-3:] == [3, 3, 3]  # every choice resumed the prompt ...
    cached = {d.index: d.cached_tokens for d in deltas if d.cached_tokens}
    assert cached == {0: 3}  # ... and the request's prompt is reported once
    batcher.shutdown()


class FailingPrefill(CountingRunner):
    def prefill(self, seq_id: int, prompt_ids: list[int]) -> torch.Tensor:
        self.steps.append(("prefill", len(prompt_ids)))
        raise RuntimeError("device lost")


async def test_a_choice_that_fails_ends_its_request_without_prefilling_the_others() -> None:
    runner = FailingPrefill()
    batcher = make_batcher(runner)
    with pytest.raises(EngineError, match="prefill"):
        await collect(batcher, [1, 2, 3], replace(GREEDY, n=3))
    assert prefills(runner) == 1
    batcher.shutdown()


# --- the sampler's order -------------------------------------------------------------------------


class AllowOnly:
    """A grammar that allows one token, then the end (as `structured.Constraint` is driven)."""

    def __init__(self, tokenizer: object, grammar: str) -> None:
        self.allowed = int(grammar)
        self.done = False

    def mask(self, logits: torch.Tensor) -> None:
        keep = EOS if self.done else self.allowed
        kept = logits[keep].item()
        logits.fill_(float("-inf"))
        logits[keep] = kept

    def advance(self, token: int) -> None:
        self.done = True


class NoGrammarTokenizer:
    def __init__(self, tokenizer: object, eos_ids: object) -> None:
        pass

    def get(self) -> None:
        return None


@pytest.fixture
def allow_only(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(batch_loop, "Constraint", AllowOnly)
    monkeypatch.setattr(batch_loop, "GrammarTokenizer", NoGrammarTokenizer)


@pytest.mark.parametrize(
    "cut",
    [
        {"top_k": 1},
        {"top_k": 3},
        {"min_p": 0.05},
        {"top_k": 1, "temperature": 1.0, "seed": 1},
        {"min_p": 0.05, "temperature": 1.0, "seed": 1},
    ],
)
async def test_the_grammar_mask_comes_before_the_cuts(allow_only: None, cut: dict) -> None:
    """The model's favourite (the next letter) is forbidden: a cut made before the mask would
    keep only forbidden tokens (greedy then picks token 0, a sampled row has no mass)."""
    batcher = make_batcher(CountingRunner(length=5))
    params = replace(GREEDY, grammar="7", **cut)
    deltas = await collect(batcher, [1], params)
    assert "".join(d.text for d in deltas) == "G" and deltas[-1].finish_reason == "stop"
    batcher.shutdown()


async def test_top_logprobs_list_only_what_the_grammar_allows(allow_only: None) -> None:
    batcher = make_batcher(CountingRunner(length=5))
    deltas = await collect(batcher, [1], replace(GREEDY, grammar="7", logprobs=3))
    first = deltas[0].logprobs[0]
    assert first.token == "G" and [token for token, _ in first.top] == ["G"]
    batcher.shutdown()


class InferenceRunner(CountingRunner):
    """Logits made under `torch.inference_mode()`, as `hf` and Neuron make them (in float32 on
    a CPU without native bf16): such a tensor refuses in-place updates outside that mode."""

    def prefill(self, seq_id: int, prompt_ids: list[int]) -> torch.Tensor:
        with torch.inference_mode():
            return super().prefill(seq_id, prompt_ids).clone()

    def decode(self, seq_ids: list[int], token_ids: list[int]) -> torch.Tensor:
        with torch.inference_mode():
            return super().decode(seq_ids, token_ids).clone()


@pytest.mark.parametrize(
    "knob",
    [
        {"presence_penalty": 0.5},
        {"repetition_penalty": 1.2},
        {"logit_bias": ((3, 1.0),)},
        {"top_k": 5},
        {"min_p": 0.1, "temperature": 0.7, "seed": 1},
    ],
)
async def test_processors_work_on_the_samplers_own_float32_copy(knob: dict) -> None:
    runner = InferenceRunner(length=4)
    batcher = make_batcher(runner)
    deltas = await collect(batcher, [1], replace(GREEDY, **knob))
    assert sum(d.tokens for d in deltas) == 5 and deltas[-1].finish_reason == "stop"
    batcher.shutdown()


class LogprobsFailTokenizer(ByteTokenizer):
    """Naming token 8 as a log-probability's token (`skip_special_tokens=False`, which only
    log-probabilities ask for) raises: the stream from 5 breaks at its third token, a decode."""

    def decode(self, token_ids: list[int], skip_special_tokens: bool = True) -> str:
        if not skip_special_tokens and 8 in token_ids:
            raise ValueError("cannot name an alternative")
        return super().decode(token_ids, skip_special_tokens)


async def test_log_probabilities_that_fail_end_their_stream_alone() -> None:
    runner = CountingRunner(length=20)
    runner.step_delay_s = 0.01
    runner.capacity = 8
    batcher = ContinuousBatcher(runner, LogprobsFailTokenizer(), frozenset({EOS}))
    batcher.start()
    other = asyncio.ensure_future(collect(batcher, [10]))
    await eventually(lambda: any(kind == "decode" for kind, _ in runner.steps))
    with pytest.raises(EngineError, match="cannot name an alternative"):
        await asyncio.wait_for(collect(batcher, [5], replace(GREEDY, logprobs=1)), 10)
    assert sum(d.tokens for d in await other) == 21  # the other stream went on to its end
    batcher.shutdown()


class LongSecond(ShortOfMemory):
    """As `ShortOfMemory` with room for 120 tokens, but the streams from 1 and 5 run ten times
    longer than the one from 9 (40 tokens): two of them outgrow the memory without a third."""

    kv_tokens = 120

    def __init__(self) -> None:
        super().__init__()
        self.length = 40

    def _next(self, seq_id: int) -> torch.Tensor:
        last, emitted = self.state[seq_id]
        length = self.length * (10 if self.held.get(seq_id, [0])[0] in (1, 5) else 1)
        token = EOS if emitted >= length else last % (VOCAB - 2) + 1  # within the vocabulary
        self.state[seq_id] = (token, emitted + 1)
        return self._logits(token)


async def test_a_preempted_stream_resumes_when_a_running_one_is_cancelled() -> None:
    """Memory freed by a client that left goes to the preempted stream at once, not when the
    remaining streams finish."""
    runner = LongSecond()
    LONG = replace(GREEDY, max_tokens=1000)
    runner.step_delay_s = 0.01
    batcher = make_batcher(runner)
    first = asyncio.ensure_future(collect(batcher, [1], LONG))
    second = asyncio.ensure_future(collect(batcher, [5], LONG))
    await eventually(lambda: ("decode", 2) in runner.steps)
    third = asyncio.ensure_future(collect(batcher, [9], LONG))
    await eventually(lambda: batcher.stats.preemptions > 0)
    first.cancel()
    deltas = await asyncio.wait_for(third, 10)
    assert deltas[-1].finish_reason == "stop" and not second.done()
    second.cancel()
    batcher.shutdown()


class CountedGrammar(AllowOnly):
    """`AllowOnly`, counting compilations and copies, and where each compilation ran."""

    compiled: ClassVar[list[str]] = []
    copied: ClassVar[int] = 0

    def __init__(self, tokenizer: object, grammar: str) -> None:
        super().__init__(tokenizer, grammar)
        CountedGrammar.compiled.append(threading.current_thread().name)

    def copy(self) -> CountedGrammar:
        CountedGrammar.copied += 1
        twin = CountedGrammar.__new__(CountedGrammar)
        twin.allowed, twin.done = self.allowed, self.done
        return twin


async def test_a_grammar_is_compiled_once_per_request_off_both_loops(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(batch_loop, "Constraint", CountedGrammar)
    monkeypatch.setattr(batch_loop, "GrammarTokenizer", NoGrammarTokenizer)
    CountedGrammar.compiled, CountedGrammar.copied = [], 0
    batcher = make_batcher(CountingRunner(length=5))
    deltas = await collect(batcher, [1], replace(GREEDY, grammar="7", n=3))
    assert texts_by_choice(deltas) == {0: "G", 1: "G", 2: "G"}
    assert len(CountedGrammar.compiled) == 1 and CountedGrammar.copied == 2
    # Neither the event loop's thread nor the batching loop's.
    assert CountedGrammar.compiled[0] not in {threading.main_thread().name, "continuous-batcher"}
    batcher.shutdown()


async def test_occupancy_counts_requests_not_their_choices() -> None:
    runner = CountingRunner(length=30)
    runner.step_delay_s = 0.01
    observer = RecordingObserver()
    batcher = ContinuousBatcher(runner, ByteTokenizer(), frozenset({EOS}), observer=observer)
    batcher.start()
    await collect(batcher, [1], replace(GREEDY, n=3))
    await asyncio.sleep(0.05)
    assert max(running for running, _ in observer.seen) == 1  # one request of three choices
    assert observer.seen[-1] == (0, 0)
    batcher.shutdown()
