"""The real CPU engine on the embedded model, loaded once per test session."""

from __future__ import annotations

import importlib
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest

from backend.engines.hf import HFEngine
from backend.settings import BackendSettings

STAND_IN = Path(__file__).resolve().parents[2] / "neuronx"


@pytest.fixture(scope="session")
def hf_engine() -> Iterator[HFEngine]:
    """In the dtype the suite runs in (`LLM_DTYPE`; `auto` picks by the CPU)."""
    engine = HFEngine(BackendSettings(max_context_len=1024, max_batch_size=4))
    engine.start()
    yield engine
    engine.shutdown()


@pytest.fixture(scope="session")
def neuronx() -> ModuleType:
    """The transformers-neuronx stand-in, importable as `transformers_neuronx`."""
    sys.path.insert(0, str(STAND_IN))
    return importlib.import_module("transformers_neuronx")
