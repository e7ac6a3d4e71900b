"""Latency metrics time tokens where the loop samples them, not the merged deltas it sends."""

from __future__ import annotations

import threading
from types import SimpleNamespace

import torch

from backend.generation import Delta, SamplingParams
from backend.metrics import RequestMetrics, RequestTracker
from backend.replica.loop import ContinuousBatcher

VOCAB = 8
# Decode step times of the runner below, repeated: four quick steps, then a slow one.
STEPS_S = (0.02, 0.02, 0.02, 0.02, 0.15)
PREFILL_S = 0.1
INTERVAL_S = 0.2  # the loop merges a stream's deltas over this long


class Recorder:
    """A histogram or counter that keeps what it was given."""

    def __init__(self) -> None:
        self.values: list[float] = []

    def observe(self, value: float) -> None:
        self.values.append(value)

    def inc(self, value: float = 1.0) -> None:
        self.values.append(value)


def recorded_metrics() -> RequestMetrics:
    """`RequestMetrics` as the tracker uses it, recording instead of exporting."""
    names = ("ttft", "itl", "e2e", "generation_tokens", "prefix_hits")
    metrics = SimpleNamespace(**{name: Recorder() for name in names}, finish=lambda _: None)
    return metrics  # type: ignore[return-value]


class TimedRunner:
    """One token per step (always token 1), each step taking a known time."""

    chunked_prefill = False
    mixed_batch = False
    prefix_caching = False
    capacity = 4
    kv_tokens = None

    def __init__(self) -> None:
        self.steps = 0

    def prefill(self, seq_id: int, prompt_ids: list[int]) -> torch.Tensor:
        threading.Event().wait(PREFILL_S)
        return _token_one()

    def decode(self, seq_ids: list[int], token_ids: list[int]) -> torch.Tensor:
        threading.Event().wait(STEPS_S[self.steps % len(STEPS_S)])
        self.steps += 1
        return torch.stack([_token_one() for _ in seq_ids])

    def lookup(self, prompt_ids: list[int]) -> int:
        return 0

    def resume(self, seq_id: int, prompt_ids: list[int]) -> int:
        return 0

    def release(self, seq_id: int) -> None:
        pass

    def reset(self) -> None:
        pass

    def kv_usage(self) -> float:
        return 0.0


def _token_one() -> torch.Tensor:
    logits = torch.full((VOCAB,), -1e9)
    logits[1] = 0.0
    return logits


class LetterTokenizer:
    def decode(self, token_ids: list[int], skip_special_tokens: bool = True) -> str:
        return "a" * len(token_ids)


async def test_latencies_are_those_of_the_steps_whatever_the_stream_interval() -> None:
    tokens = 26  # the first from prefill, then five rounds of the five steps
    batcher = ContinuousBatcher(
        TimedRunner(), LetterTokenizer(), frozenset(), stream_interval_s=INTERVAL_S
    )
    batcher.start()
    metrics = recorded_metrics()
    tracker = RequestTracker(metrics)
    deltas = 0
    try:
        params = SamplingParams(max_tokens=tokens, ignore_eos=True)
        async for delta in batcher.stream([1, 2, 3], params):
            tracker.tokens(delta)
            deltas += 1
    finally:
        batcher.shutdown()
    ttft, itl = metrics.ttft.values, metrics.itl.values  # type: ignore[attr-defined]
    assert deltas < tokens / 2  # merged: most deltas carry several tokens
    assert len(ttft) == 1 and PREFILL_S <= ttft[0] < PREFILL_S + 0.1
    assert len(itl) == tokens - 1
    slow = [gap for gap in itl if gap >= STEPS_S[-1]]
    quick = [gap for gap in itl if gap < STEPS_S[-1] / 2]
    # Every slow step shows as itself, and so does every quick one (sleeps only overshoot).
    assert len(slow) == (tokens - 1) // len(STEPS_S)
    assert len(quick) == len(itl) - len(slow)


def test_the_gaps_of_several_choices_are_timed_within_each_choice() -> None:
    """Two choices' tokens interleave (one each per step, 0.1 s apart): every gap is a step,
    never the time between one choice's token and the other's; one first token per request."""
    metrics = recorded_metrics()
    tracker = RequestTracker(metrics)
    start = tracker._start
    for step in range(1, 4):
        for index in (0, 1):
            tracker.tokens(
                Delta("a", 1, token_times=(start + step / 10 + index / 1000,), index=index)
            )
    assert len(metrics.ttft.values) == 1  # type: ignore[attr-defined]
    gaps = metrics.itl.values  # type: ignore[attr-defined]
    assert len(gaps) == 4 and all(abs(gap - 0.1) < 1e-9 for gap in gaps)
