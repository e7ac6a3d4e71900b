"""The KV memory budget: its default, the container's limit, and refusals with the numbers."""

from __future__ import annotations

from pathlib import Path

import pytest

from backend.engines.kv_budget import GIB, check_fits, kv_budget_bytes, machine_memory_bytes
from backend.engines.llamacpp import LlamaCppEngine
from backend.errors import EngineError
from backend.settings import BackendSettings


def test_the_default_is_a_quarter_of_memory_at_most_two_gib() -> None:
    assert kv_budget_bytes(0, 4 * GIB) == GIB
    assert kv_budget_bytes(0, 64 * GIB) == 2 * GIB
    assert kv_budget_bytes(3.5, 64 * GIB) == int(3.5 * GIB)


def test_a_container_limit_caps_the_machine_memory(tmp_path: Path) -> None:
    limit = tmp_path / "memory.max"
    limit.write_text("1073741824\n")
    assert machine_memory_bytes(limit) == GIB
    limit.write_text("max\n")  # no limit: the machine's RAM
    assert machine_memory_bytes(limit) == machine_memory_bytes(tmp_path / "absent") > GIB


def test_kv_and_host_copies_beyond_three_quarters_of_memory_are_refused() -> None:
    check_fits(2 * GIB, GIB, 4 * GIB)
    with pytest.raises(EngineError, match=r"KV cache \(3.00 GiB\).*1.00 GiB.*4.00 GiB"):
        check_fits(3 * GIB, GIB, 4 * GIB)


def test_the_engine_sizes_each_window_from_the_budget() -> None:
    # 0.05 GiB of SmolLM2's 23040-byte tokens = 2330 tokens: 4 sequences get 512 each.
    engine = LlamaCppEngine(BackendSettings(kv_cache_gib=0.05, max_batch_size=4, cpu_threads=1))
    engine.start()
    try:
        assert engine.context_window == 512
    finally:
        engine.shutdown()
    small = LlamaCppEngine(BackendSettings(kv_cache_gib=0.01, max_batch_size=4, cpu_threads=1))
    with pytest.raises(EngineError, match=r"holds 466 tokens .* fewer than 256 for each of 4"):
        small.start()
