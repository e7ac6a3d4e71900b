"""Slots: a fixed number of engine cache rows lent to the batching loop's sequences.

The loop's sequence ids grow without end; an engine with a fixed set of KV rows (llama.cpp's
sequences, transformers-neuronx's continuous-batching slots) lends one row to each running
sequence. `SlotTable` is that mapping, and what each row's cache holds.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

from backend.errors import EngineError


@dataclass
class Slot:
    """One cache row: the tokens its memory holds, in order, and who runs in it."""

    index: int
    tokens: list[int] = field(default_factory=list)
    owner: int | None = None  # the loop's sequence id; None while idle
    lent_at: int = 0  # when it was last lent (a counter): the least recently used goes first


class SlotTable:
    """`capacity` slots, each lent to at most one sequence at a time."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._clock = itertools.count(1)
        self.clear()

    def clear(self) -> None:
        """Every slot idle and empty."""
        self.slots = [Slot(i) for i in range(self.capacity)]
        self._lent: dict[int, Slot] = {}

    def idle(self) -> list[Slot]:
        """The slots nobody runs in; raises when there is none."""
        idle = [slot for slot in self.slots if slot.owner is None]
        if not idle:
            raise EngineError(f"All {self.capacity} cache slots are in use.")
        return idle

    def least_recently_used(self) -> Slot:
        """The idle slot lent longest ago."""
        return min(self.idle(), key=lambda slot: slot.lent_at)

    def lend(self, slot: Slot, seq_id: int) -> None:
        """`seq_id` runs in `slot` from now on."""
        slot.owner, slot.lent_at = seq_id, next(self._clock)
        self._lent[seq_id] = slot

    def of(self, seq_id: int) -> Slot | None:
        """The slot `seq_id` runs in, if any."""
        return self._lent.get(seq_id)

    def give_back(self, seq_id: int) -> Slot | None:
        """`seq_id` is done: its slot is idle again (its tokens stay); None for unknown ids."""
        slot = self._lent.pop(seq_id, None)
        if slot is not None:
            slot.owner = None
        return slot

    def lent(self) -> dict[int, Slot]:
        """The running sequences and their slots (a copy)."""
        return dict(self._lent)

    def usage(self, window: int) -> float:
        """Tokens of running sequences over every slot's `window` cells."""
        return sum(len(slot.tokens) for slot in self._lent.values()) / (self.capacity * window)
