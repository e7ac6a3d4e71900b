"""Reading a GGUF file's metadata and tensors with gguf-py, without numpy's memmap overhead.

gguf-py's `GGUFReader` slices its `np.memmap` for every part of every metadata item (a
49152-token vocabulary and its merges: a million slices), and each slice of a memmap runs
numpy's Python bookkeeping for that subclass. Over a plain array view of the same mapping the
reading is the same, without that. Imported only where a GGUF is converted (first starts).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import gguf
import numpy as np


class GGUFFile(gguf.GGUFReader):
    """`GGUFReader`, reading through a plain `ndarray` view of its memory map (which the view
    keeps open)."""

    @property  # type: ignore[override]
    def data(self) -> np.ndarray[Any, Any]:
        return self._array

    @data.setter
    def data(self, mapped: np.ndarray[Any, Any]) -> None:  # set once, by GGUFReader.__init__
        self._array = np.asarray(mapped)


@contextlib.contextmanager
def gguf_read_as_array() -> Iterator[None]:
    """While inside, a caller that takes `gguf.GGUFReader` at call time (transformers'
    `load_gguf_checkpoint` imports it in its body) reads with `GGUFFile`."""
    original = gguf.GGUFReader
    gguf.GGUFReader = GGUFFile  # type: ignore[misc]
    try:
        yield
    finally:
        gguf.GGUFReader = original  # type: ignore[misc]
