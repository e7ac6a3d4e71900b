"""A key/value cache for a batch whose members come and go, in buffers allocated ahead of use.

Rows are sequences and columns positions, left-padded: every row's newest token is in the same
column, so a decode step writes one column of each layer in place instead of copying the cache
(`DynamicCache` concatenates, which copies all of it at every step). A row joins by copying its
prefill cache in and leaves by the last row moving into its place; the window's left edge moves
past padding that no row needs. Capacity grows geometrically, so the whole cache is copied only
O(log n) times over a conversation, never per step.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

# Columns added at the least when the buffers grow.
_MIN_GROWTH = 256


class BatchKVCache(Cache):
    """A transformers `Cache` over preallocated [rows, heads, columns, dim] buffers per layer."""

    def __init__(self, num_layers: int, expected_rows: int = 8) -> None:
        super().__init__(layers=[_BufferLayer(self, i) for i in range(num_layers)])
        self._expected_rows = expected_rows  # rows allocated at first; more double the buffers
        self._keys: list[torch.Tensor] = []
        self._values: list[torch.Tensor] = []
        self._mask = torch.zeros(0, 0, dtype=torch.long)  # 1 where a row has a token
        self.rows = 0
        self._start = 0  # the window in use: columns [start, end)
        self._end = 0

    @property
    def width(self) -> int:
        """Columns in the window: the longest row's length."""
        return self._end - self._start

    def attention_mask(self, new_columns: int = 0) -> torch.Tensor:
        """Open `new_columns` for every row and return the mask the forward pass will need."""
        if new_columns:
            self._reserve(new_columns)
            self._mask[: self.rows, self._end : self._end + new_columns] = 1
        return self._mask[: self.rows, self._start : self._end + new_columns]

    def positions(self) -> torch.Tensor:
        """Each row's next position id: the number of tokens it holds."""
        return self._mask[: self.rows, self._start : self._end].sum(dim=1)

    def advance(self, columns: int) -> None:
        """Commit the columns the last forward pass wrote."""
        self._end += columns

    def write(
        self, layer: int, keys: torch.Tensor, values: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Store a layer's new columns in place; return its keys and values over the window."""
        new = slice(self._end, self._end + keys.shape[2])
        self._keys[layer][: self.rows, :, new] = keys
        self._values[layer][: self.rows, :, new] = values
        return self.window(layer, extra=keys.shape[2])

    def window(self, layer: int, extra: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """A layer's keys and values, [rows, heads, width + extra, dim] (views, not copies)."""
        rows, columns = slice(0, self.rows), slice(self._start, self._end + extra)
        return self._keys[layer][rows, :, columns], self._values[layer][rows, :, columns]

    def append_row(self, layers: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Add a sequence from its own [1, heads, length, dim] cache; it becomes the last row."""
        length = layers[0][0].shape[2]
        if not self._keys:
            self._allocate(layers[0][0])
        if self.rows == 0:  # an empty batch starts mid-buffer: room for longer rows to come
            self._start = self._end = min(max(length, self._columns() // 2), self._columns())
        full = self.rows == self._mask.shape[0]
        if full or self._end < length:
            self._relayout(
                rows=self._mask.shape[0] * (2 if full else 1),
                left=max(0, length - self.width) + _MIN_GROWTH,
                right=max(_MIN_GROWTH, self.width),
            )
        row, first = self.rows, self._end - length
        for buffer, (new, _) in zip(self._keys, layers, strict=True):
            buffer[row, :, first : self._end] = new[0]
        for buffer, (_, new) in zip(self._values, layers, strict=True):
            buffer[row, :, first : self._end] = new[0]
        self._mask[row] = 0
        self._mask[row, first : self._end] = 1
        self._start = min(self._start, first)
        self.rows += 1

    def row_layers(self, row: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """A copy of one row's keys and values without its padding, [1, heads, length, dim]."""
        length = int(self._mask[row, self._start : self._end].sum())
        tokens = slice(self._end - length, self._end)  # left-padded: a row ends at the window's end
        return [
            (k[row : row + 1, :, tokens].clone(), v[row : row + 1, :, tokens].clone())
            for k, v in zip(self._keys, self._values, strict=True)
        ]

    def remove_row(self, row: int) -> None:
        """Drop a row: the last row moves into its place (callers renumber it)."""
        last = self.rows - 1
        window = slice(self._start, self._end)
        if row != last:
            for buffer in (*self._keys, *self._values):
                buffer[row, :, window] = buffer[last, :, window]
            self._mask[row] = self._mask[last]
        self._mask[last] = 0
        self.rows = last
        if self.rows == 0:
            self._start = self._end
            return
        used = self._mask[: self.rows, window].any(dim=0)
        self._start += int(used.long().argmax())  # padding nobody attends to is dropped

    def filled(self) -> float:
        """Share of the allocated cells that hold a row's token."""
        cells = self._mask.numel()
        return float(self._mask.sum()) / cells if cells else 0.0

    def reset(self) -> None:
        """Forget every row (buffers are kept for reuse)."""
        self._mask.zero_()
        self.rows = 0
        self._start = self._end = 0

    def _columns(self) -> int:
        return self._mask.shape[1]

    def _reserve(self, columns: int) -> None:
        if self._end + columns > self._columns():
            self._relayout(self._mask.shape[0], left=0, right=max(_MIN_GROWTH, self.width))

    def _allocate(self, like: torch.Tensor) -> None:
        """Empty buffers shaped after a layer's keys."""
        _, heads, _, dim = like.shape
        empty = like.new_zeros(self._expected_rows, heads, 0, dim)
        self._keys = [empty for _ in self.layers]
        self._values = [empty for _ in self.layers]
        self._mask = torch.zeros(self._expected_rows, 0, dtype=torch.long)

    def _relayout(self, rows: int, left: int, right: int) -> None:
        """New buffers with `left` free columns before the window and `right` after it."""
        window, width = slice(self._start, self._end), self.width
        moved = slice(left, left + width)

        def grown(old: torch.Tensor) -> torch.Tensor:
            new = old.new_zeros(rows, old.shape[1], left + width + right, old.shape[3])
            new[: self.rows, :, moved] = old[: self.rows, :, window]
            return new

        self._keys = [grown(k) for k in self._keys]
        self._values = [grown(v) for v in self._values]
        mask = torch.zeros(rows, left + width + right, dtype=torch.long)
        mask[: self.rows, moved] = self._mask[: self.rows, window]
        self._mask = mask
        self._start, self._end = left, left + width


class _BufferLayer(CacheLayerMixin):
    """The view transformers' attention calls for one layer; the storage is `BatchKVCache`'s."""

    is_sliding = False

    def __init__(self, cache: BatchKVCache, index: int) -> None:
        super().__init__()
        self._cache = cache
        self._index = index
        self.is_initialized = True

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        """Nothing to do: the buffers exist before the first forward pass."""

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Write this step's keys and values; attention reads the whole window."""
        return self._cache.write(self._index, key_states, value_states)

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        """Key length and offset of the mask transformers builds."""
        return self._cache.width + query_length, 0

    def get_seq_length(self) -> int:
        """Columns already cached."""
        return self._cache.width

    def get_max_length(self) -> int:
        """No fixed maximum: the buffers grow."""
        return -1
