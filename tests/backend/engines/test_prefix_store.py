"""`PrefixStore`: longest-prefix lookup, the byte budget, least recently used first."""

from __future__ import annotations

from backend.engines.prefix_store import PrefixStore, common_prefix


def test_common_prefix_counts_leading_equal_tokens() -> None:
    assert common_prefix([1, 2, 3], [1, 2, 4]) == 2
    assert common_prefix([1, 2], [1, 2, 3]) == 2
    assert common_prefix([], [1]) == 0 and common_prefix([5], [1]) == 0


def test_the_entry_sharing_the_longest_prefix_is_found() -> None:
    store: PrefixStore[str] = PrefixStore(100)
    store.put([1, 2, 3, 4], "a", 10)
    store.put([1, 2, 9], "b", 10)
    assert store.best([1, 2, 3, 7]) == (3, store.best([1, 2, 3])[1])
    shared, entry = store.best([1, 2, 9, 9])
    assert shared == 3 and entry is not None and entry.payload == "b"
    assert store.best([8]) == (0, None)


def test_the_least_recently_used_go_first_when_over_budget() -> None:
    store: PrefixStore[str] = PrefixStore(25)
    store.put([1], "a", 10)
    store.put([2], "b", 10)
    _, a = store.best([1])
    assert a is not None
    store.touch(a)  # a is now more recent than b
    store.put([3], "c", 10)
    assert len(store) == 2 and store.nbytes == 20
    assert store.best([2]) == (0, None)  # b went
    assert store.best([1])[0] == 1 and store.best([3])[0] == 1


def test_an_entry_larger_than_the_budget_is_refused_and_prefixes_are_replaced() -> None:
    store: PrefixStore[str] = PrefixStore(25)
    assert not store.put([1, 2], "big", 26)
    assert store.put([1, 2], "turn 1", 10)
    assert store.put([1, 2, 3, 4], "turn 2", 12)  # the conversation went on: holds all of turn 1
    assert len(store) == 1 and store.nbytes == 12
    store.clear()
    assert len(store) == 0 and store.nbytes == 0
