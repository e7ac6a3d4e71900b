"""The real CPU engine on the embedded model, loaded once per test session."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from backend.engines.hf import HFEngine
from backend.settings import BackendSettings


@pytest.fixture(scope="session")
def hf_engine() -> Iterator[HFEngine]:
    """fp32, so batched and single-stream greedy decoding must agree exactly."""
    engine = HFEngine(BackendSettings(dtype="float32", max_context_len=1024, max_batch_size=4))
    engine.start()
    yield engine
    engine.shutdown()
