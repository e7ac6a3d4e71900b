"""Delivery: a request's deltas from the loop thread to its caller on the event loop.

A stream's first text goes out as soon as it is sampled; after that its text goes out at most
every interval, merged. The loop thread holds the text (`Outbox`): each item it posts wakes the
event loop, whose thread then competes with the engine's for the GIL and the cores, and each
item crosses Ray, the ingress and the proxy, costing them CPU the model needs. The interval can
grow with the load (`paced_interval`), so that the items of all streams together stay within
what those processes can pass without slowing the model.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncGenerator, Callable

from backend.generation import Delta

Item = Delta | BaseException


def paced_interval(interval_s: float, updates_per_s: float, streams: int) -> float:
    """The interval between one stream's items while `streams` run: `interval_s`, or longer
    where the streams' items together would pass `updates_per_s` (0: no bound)."""
    if updates_per_s <= 0:
        return interval_s
    return max(interval_s, streams / updates_per_s)


class Outbox:
    """A request's items on the loop thread: the first text, an end and an error are posted at
    once; other text is held until `interval_s()` (asked after each post: the load changes) has
    passed since the last post, then posted with what was held."""

    def __init__(
        self,
        post: Callable[[list[Item]], None],
        interval_s: Callable[[], float],
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._post = post
        self._interval_s = interval_s
        self._clock = clock
        self._held: list[Item] = []
        self._next_post = 0.0  # the first text goes out at once

    def put(self, item: Item) -> None:
        self._held.append(item)
        now = self._clock()
        if _open(item) and now < self._next_post:
            return
        items, self._held = self._held, []
        self._post(items)
        self._next_post = now + self._interval_s()


async def delivered(posts: asyncio.Queue[list[Item]], choices: int) -> AsyncGenerator[Delta, None]:
    """The deltas of `choices` streams until each has finished, merging what was posted since the
    last one was taken. An error ends the request, after what came before it."""
    unfinished = choices
    while unfinished:
        items = await posts.get()
        while not posts.empty():
            items += posts.get_nowait()
        failed = next((i for i, item in enumerate(items) if not isinstance(item, Delta)), None)
        ready = [item for item in items[:failed] if isinstance(item, Delta)]
        for delta in merge_by_choice(ready):
            if delta.finish_reason is not None:
                unfinished -= 1
            yield delta
        if failed is not None:
            error = items[failed]
            assert isinstance(error, BaseException)
            raise error


def merge_by_choice(deltas: list[Delta]) -> list[Delta]:
    """Consecutive deltas as one per choice, choices in the order they first appear."""
    by_choice: dict[int, list[Delta]] = {}
    for delta in deltas:
        by_choice.setdefault(delta.index, []).append(delta)
    return [_merge(group) for group in by_choice.values()]


def _open(item: Item) -> bool:
    return isinstance(item, Delta) and item.finish_reason is None


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
