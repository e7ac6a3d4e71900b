"""The real CPU engine on the embedded model, loaded once per test session."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from backend.engines.hf import HFEngine
from backend.settings import BackendSettings


@pytest.fixture(scope="session")
def hf_engine() -> Iterator[HFEngine]:
    """In the dtype the suite runs in (`LLM_DTYPE`; `auto` picks by the CPU)."""
    engine = HFEngine(BackendSettings(max_context_len=1024, max_batch_size=4))
    engine.start()
    yield engine
    engine.shutdown()
