"""Finished conversations' KV kept in host memory under a byte budget, found by token prefix.

Runners that reuse KV across requests park here what their live memory cannot keep: llama.cpp's
serialised sequence states, transformers' per-layer key/value tensors. A request looks up the
entry that shares the longest token prefix with its prompt, as llama.cpp's server does with its
RAM prompt cache (`--cache-ram`, `server_prompt_cache`); the least recently used entries go first
when the budget is exceeded.
"""

from __future__ import annotations

import collections
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

Payload = TypeVar("Payload")


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """Number of leading tokens `a` and `b` share."""
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


@dataclass(frozen=True)
class Parked(Generic[Payload]):
    """One parked prefix: its tokens, the engine's copy of their KV, and that copy's size."""

    tokens: tuple[int, ...]
    payload: Payload
    nbytes: int


class PrefixStore(Generic[Payload]):
    """An LRU of parked prefixes whose payloads take at most `budget_bytes` together."""

    def __init__(self, budget_bytes: int) -> None:
        self.budget_bytes = budget_bytes
        self._entries: collections.OrderedDict[tuple[int, ...], Parked[Payload]] = (
            collections.OrderedDict()
        )
        self.nbytes = 0

    def __len__(self) -> int:
        return len(self._entries)

    def put(self, tokens: list[int], payload: Payload, nbytes: int) -> bool:
        """Park a prefix (it becomes the most recent); False when it alone exceeds the budget.

        Entries that are prefixes of the new one are dropped: it holds all they hold.
        """
        if nbytes > self.budget_bytes or not tokens:
            return False
        key = tuple(tokens)
        for older in [k for k in self._entries if key[: len(k)] == k]:
            self._drop(older)
        self._entries[key] = Parked(key, payload, nbytes)
        self.nbytes += nbytes
        while self.nbytes > self.budget_bytes:
            self._drop(next(iter(self._entries)))
        return True

    def best(self, prompt: list[int]) -> tuple[int, Parked[Payload] | None]:
        """The entry sharing the longest prefix with `prompt`, and that length (0, None: none)."""
        found: Parked[Payload] | None = None
        longest = 0
        for entry in self._entries.values():
            shared = common_prefix(entry.tokens, prompt)
            if shared > longest:
                found, longest = entry, shared
        return longest, found

    def touch(self, entry: Parked[Payload]) -> None:
        """The entry was used: it becomes the most recent (if it is still here)."""
        if entry.tokens in self._entries:
            self._entries.move_to_end(entry.tokens)

    def shrink_to(self, limit: int) -> None:
        """Drop the least recently used entries until the rest take at most `limit` bytes."""
        while self._entries and self.nbytes > limit:
            self._drop(next(iter(self._entries)))

    def clear(self) -> None:
        """Forget every entry."""
        self._entries.clear()
        self.nbytes = 0

    def _drop(self, key: tuple[int, ...]) -> None:
        self.nbytes -= self._entries.pop(key).nbytes
