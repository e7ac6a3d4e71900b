"""The deltas' way from the loop thread to the caller: held and posted at the interval, merged."""

from __future__ import annotations

import asyncio
from contextlib import aclosing

import pytest

from backend.errors import EngineError
from backend.generation import Delta
from backend.replica.delivery import Item, Outbox, delivered, merge_by_choice, paced_interval


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


class Clock:
    """A clock the test moves."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def outbox(intervals: list[float]) -> tuple[Outbox, list[list[Item]], Clock]:
    """An outbox whose posts are recorded, its interval asked from `intervals` in turn."""
    posts: list[list[Item]] = []
    clock = Clock()
    asked = iter(intervals)
    return Outbox(posts.append, lambda: next(asked), clock), posts, clock


def texts(posts: list[list[Item]]) -> list[list[str]]:
    return [[item.text if isinstance(item, Delta) else "error" for item in post] for post in posts]


def test_the_first_text_is_posted_at_once_and_later_text_held_for_the_interval() -> None:
    box, posts, clock = outbox([0.05, 0.05])
    box.put(Delta("a", 1))
    clock.now = 0.02
    box.put(Delta("b", 1))
    clock.now = 0.04
    box.put(Delta("c", 1))
    assert texts(posts) == [["a"]]  # "b" and "c" wait: the interval has not passed
    clock.now = 0.05
    box.put(Delta("d", 1))
    assert texts(posts) == [["a"], ["b", "c", "d"]]  # one post, one wake of the event loop


def test_the_interval_is_asked_again_after_every_post() -> None:
    """The load changes while a stream runs: a longer interval holds the next text longer."""
    box, posts, clock = outbox([0.0, 0.3, 0.0])
    box.put(Delta("a", 1))
    box.put(Delta("b", 1))  # no interval after the first: as it comes
    clock.now = 0.29
    box.put(Delta("c", 1))
    assert texts(posts) == [["a"], ["b"]]
    clock.now = 0.30
    box.put(Delta("d", 1))
    assert texts(posts) == [["a"], ["b"], ["c", "d"]]


def test_an_end_or_an_error_is_posted_at_once_with_what_was_held() -> None:
    box, posts, _ = outbox([10.0, 10.0, 10.0])
    box.put(Delta("a", 1))
    box.put(Delta("b", 1))
    box.put(Delta("", 0, "stop", index=0))
    assert texts(posts) == [["a"], ["b", ""]]
    box.put(Delta("c", 1, index=1))
    box.put(EngineError("boom"))
    assert texts(posts) == [["a"], ["b", ""], ["c", "error"]]


async def test_what_was_posted_meanwhile_comes_merged_and_an_error_last() -> None:
    posts: asyncio.Queue[list[Item]] = asyncio.Queue()
    posts.put_nowait([Delta("a", 1, index=0)])
    posts.put_nowait([Delta("b", 1, index=1), Delta("c", 1, index=0)])
    posts.put_nowait([Delta("", 0, "stop", index=0), EngineError("boom")])
    got: list[Delta] = []
    with pytest.raises(EngineError, match="boom"):
        async with aclosing(delivered(posts, 2)) as stream:
            async for delta in stream:
                got.append(delta)
    assert [(d.index, d.text, d.finish_reason) for d in got] == [(0, "ac", "stop"), (1, "b", None)]


async def test_delivery_ends_when_every_choice_has_finished() -> None:
    posts: asyncio.Queue[list[Item]] = asyncio.Queue()
    posts.put_nowait([Delta("a", 1, "stop", index=0)])
    posts.put_nowait([Delta("b", 1, "length", index=1)])
    async with aclosing(delivered(posts, 2)) as stream:
        got = [delta async for delta in stream]
    assert [d.finish_reason for d in got] == ["stop", "length"]
