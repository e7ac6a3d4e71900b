"""What a `LlamaCppRunner` holds, read the way a test may: through its slot table, and through
llama.cpp's own memory API for what the KV cells really contain (never changed here)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

from backend.engines.llamacpp_runner import LlamaCppRunner, llama


def lent(runner: LlamaCppRunner) -> dict[int, int]:
    """The running sequences: the loop's id -> llama.cpp's sequence id."""
    return {seq_id: slot.index for seq_id, slot in runner.slots.lent().items()}


def held_tokens(runner: LlamaCppRunner) -> list[list[int]]:
    """The tokens each llama.cpp sequence holds (running or parked), by sequence id."""
    return [list(slot.tokens) for slot in runner.slots.slots]


def pos_max(runner: LlamaCppRunner, index: int) -> int:
    """The largest position in a sequence's KV cells, -1 when empty (llama.cpp's own view)."""
    return int(llama.llama_memory_seq_pos_max(runner._memory, index))


async def until(condition: Callable[[], bool], timeout_s: float = 10) -> None:
    """Wait for what the batching loop publishes (its occupancy) to meet `condition`: a stream's
    last delta reaches its client just before the loop releases its sequence."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "not met in time"
        await asyncio.sleep(0.01)
