"""The slot table: a fixed number of cache rows lent to the loop's sequences."""

from __future__ import annotations

import pytest

from backend.engines.slots import SlotTable
from backend.errors import EngineError


def test_slots_are_lent_once_and_given_back_with_their_tokens() -> None:
    table = SlotTable(2)
    first = table.least_recently_used()
    table.lend(first, seq_id=10)
    first.tokens.extend([1, 2, 3])
    second = table.least_recently_used()
    assert second is not first
    table.lend(second, seq_id=11)
    with pytest.raises(EngineError, match="All 2 cache slots are in use"):
        table.idle()
    assert table.of(10) is first and table.lent() == {10: first, 11: second}
    assert table.usage(window=10) == 3 / 20
    assert table.give_back(10) is first and first.owner is None and first.tokens == [1, 2, 3]
    assert table.give_back(10) is None  # twice, or unknown: nothing
    assert table.usage(window=10) == 0.0  # idle slots' tokens do not count


def test_the_least_recently_lent_idle_slot_goes_first() -> None:
    table = SlotTable(3)
    for seq_id in range(3):
        table.lend(table.least_recently_used(), seq_id)
    for seq_id in (1, 0, 2):
        table.give_back(seq_id)
    assert table.least_recently_used().index == 0  # lent first, long ago
    table.clear()
    assert table.lent() == {} and all(not slot.tokens for slot in table.slots)
