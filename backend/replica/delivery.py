"""Delivery: a request's deltas from the loop thread to its caller on the event loop.

A stream's first text goes out as soon as it is sampled; after that its text goes out at most
every `interval_s`, merged: each item crosses Ray, the ingress and the proxy, and costs them CPU
the model needs. The interval can grow with the load (`paced_interval`), so that the items of all
streams together stay within what those processes can pass without slowing the model.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, Callable

from backend.generation import Delta


def paced_interval(interval_s: float, updates_per_s: float, streams: int) -> float:
    """The interval between one stream's items while `streams` run: `interval_s`, or longer
    where the streams' items together would pass `updates_per_s` (0: no bound)."""
    if updates_per_s <= 0:
        return interval_s
    return max(interval_s, streams / updates_per_s)


async def delivered(
    deltas: asyncio.Queue[Delta | BaseException],
    choices: int,
    interval_s: Callable[[], float],
) -> AsyncGenerator[Delta, None]:
    """The deltas of `choices` streams until each has finished: the first text at once, then at
    most one item per choice every `interval_s()` (asked after each item: the load changes),
    merging what arrived meanwhile. An error ends the request, after what came before it."""
    loop = asyncio.get_running_loop()
    next_send = 0.0  # the first text goes out at once
    unfinished = choices
    while unfinished:
        items = [await deltas.get()]
        if _open(items[-1]) and (wait := next_send - loop.time()) > 0:
            await asyncio.sleep(wait)
        while not deltas.empty():
            items.append(deltas.get_nowait())
        failed = next((i for i, item in enumerate(items) if not isinstance(item, Delta)), None)
        ready = [item for item in items[:failed] if isinstance(item, Delta)]
        for delta in merge_by_choice(ready):
            if delta.finish_reason is not None:
                unfinished -= 1
            yield delta
        next_send = loop.time() + interval_s()
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


def _open(item: Delta | BaseException) -> bool:
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
