"""The deltas' way from the loop thread to the caller: merging, and the interval's pacing."""

from __future__ import annotations

import asyncio
from contextlib import aclosing

import pytest

from backend.generation import Delta
from backend.replica.delivery import delivered, merge_by_choice, paced_interval


@pytest.mark.parametrize(
    ("streams", "expected_s"),
    [(1, 0.05), (2, 0.05), (4, 0.1), (8, 0.2), (16, 0.4)],
)
def test_the_interval_grows_once_the_streams_together_pass_the_bound(
    streams: int, expected_s: float
) -> None:
    assert paced_interval(0.05, 40, streams) == pytest.approx(expected_s)


def test_without_a_bound_the_interval_is_the_set_one() -> None:
    assert paced_interval(0.05, 0, 100) == 0.05
    assert paced_interval(0.0, 0, 100) == 0.0


def test_consecutive_deltas_merge_per_choice_in_first_seen_order() -> None:
    deltas = [Delta("a", 1, index=1), Delta("b", 1, index=0), Delta("c", 1, "stop", index=1)]
    merged = merge_by_choice(deltas)
    assert [(d.index, d.text, d.tokens, d.finish_reason) for d in merged] == [
        (1, "ac", 2, "stop"),
        (0, "b", 1, None),
    ]


async def test_the_interval_is_asked_again_after_every_item() -> None:
    """The load changes while a stream runs: a longer interval holds the next item longer."""
    deltas: asyncio.Queue[Delta | BaseException] = asyncio.Queue()
    intervals = iter([0.0, 0.3, 0.0])
    loop = asyncio.get_running_loop()
    items = aclosing(delivered(deltas, 1, lambda: next(intervals)))
    async with items as stream:
        deltas.put_nowait(Delta("a", 1))
        assert (await anext(stream)).text == "a"
        deltas.put_nowait(Delta("b", 1))
        assert (await anext(stream)).text == "b"  # no interval after the first: as it comes
        sent = loop.time()
        deltas.put_nowait(Delta("c", 1))
        deltas.put_nowait(Delta("", 0, "stop"))
        last = await anext(stream)  # then 0.3 s: "c" and the end wait, merged
        assert loop.time() - sent >= 0.29
        assert (last.text, last.finish_reason) == ("c", "stop")
