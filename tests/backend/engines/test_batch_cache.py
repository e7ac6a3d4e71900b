"""`BatchKVCache` against a plain list-of-rows model of what each sequence has cached."""

from __future__ import annotations

import random

import pytest
import torch

from backend.engines import batch_cache
from backend.engines.batch_cache import BatchKVCache

LAYERS, HEADS, DIM = 2, 3, 4


def tokens(n: int) -> torch.Tensor:
    """[1, heads, n, dim] of distinct values."""
    return torch.randn(1, HEADS, n, DIM)


def assert_rows_hold(cache: BatchKVCache, rows: list[list[torch.Tensor]]) -> None:
    """Row r attends to exactly rows[r][layer] ([heads, n, dim]), newest in the last column."""
    assert cache.rows == len(rows)
    mask = cache.attention_mask()
    assert mask.shape == (cache.rows, cache.width)
    assert cache.positions().tolist() == [r[0].shape[1] for r in rows]
    for layer in range(LAYERS):
        keys, _ = cache.window(layer)
        for row, expected in enumerate(rows):
            assert torch.equal(keys[row][:, mask[row].bool()], expected[layer]), f"row {row}"
            assert bool(mask[row, -1]), "every row's newest token is in the last column"


@pytest.mark.parametrize("seed", range(5))
def test_rows_hold_exactly_their_tokens_through_joins_steps_and_leaves(
    seed: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(batch_cache, "_MIN_GROWTH", 2)  # grow (copy the buffers) often
    rng = random.Random(seed)
    cache = BatchKVCache(LAYERS, expected_rows=2)
    rows: list[list[torch.Tensor]] = []  # per row, per layer: [heads, n, dim]
    for _ in range(60):
        action = rng.choice(["join", "step", "step", "leave"] if rows else ["join"])
        if action == "join":
            n = rng.randint(1, 12)
            layers = [(tokens(n), tokens(n)) for _ in range(LAYERS)]
            cache.append_row(layers)
            rows.append([k[0] for k, _ in layers])
        elif action == "step":
            cache.attention_mask(1)
            for layer in range(LAYERS):
                new = torch.randn(cache.rows, HEADS, 1, DIM)
                cache.write(layer, new, torch.zeros_like(new))
                for row in range(cache.rows):
                    rows[row][layer] = torch.cat([rows[row][layer], new[row]], dim=1)
            cache.advance(1)
        else:
            leaving = rng.randrange(len(rows))
            cache.remove_row(leaving)
            rows[leaving] = rows[-1]  # the last row takes its place
            rows.pop()
        assert_rows_hold(cache, rows)
    if rows:
        longest = max(r[0].shape[1] for r in rows)
        assert cache.width == longest  # padding no row needs is dropped


def test_a_decode_step_writes_in_place() -> None:
    cache = BatchKVCache(LAYERS, expected_rows=4)
    cache.append_row([(tokens(5), tokens(5)) for _ in range(LAYERS)])
    cache.append_row([(tokens(3), tokens(3)) for _ in range(LAYERS)])
    buffer = cache._keys[0].data_ptr()
    for _ in range(50):
        cache.attention_mask(1)
        for layer in range(LAYERS):
            new = torch.randn(2, HEADS, 1, DIM)
            cache.write(layer, new, new)
        cache.advance(1)
    assert cache._keys[0].data_ptr() == buffer  # no copy of the cache per step
    assert cache.width == 55
