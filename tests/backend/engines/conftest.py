"""The real CPU engines on the embedded model, loaded once per test session."""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING

import pytest

from backend.engines.hf import HFEngine
from backend.settings import BackendSettings
from tests.backend.engines.tiny_gguf import write_tiny_llama

if TYPE_CHECKING:
    from backend.engines.llamacpp import LlamaCppEngine
    from backend.engines.llamacpp_runner import LlamaCppRunner, LlamaModel

STAND_IN = Path(__file__).resolve().parents[2] / "neuronx"
TINY = "tiny.gguf"


@pytest.fixture(scope="session")
def hf_engine() -> Iterator[HFEngine]:
    """In the dtype the suite runs in (`LLM_DTYPE`; `auto` picks by the CPU), on one torch
    thread: the quick tier runs a pytest worker per core, and torch's threads (one per core in
    each worker) would wait for each other across the workers."""
    engine = HFEngine(BackendSettings(max_context_len=1024, max_batch_size=4, cpu_threads=1))
    engine.start()
    yield engine
    engine.shutdown()


@pytest.fixture(scope="session")
def llamacpp_engine() -> Iterator[LlamaCppEngine]:
    """The llama.cpp engine on the embedded GGUF, with the same limits as `hf_engine`.

    One thread: llama.cpp's threads wait for each other at every operation by spinning, so on
    a machine whose cores are busy with other work (CI, the e2e services) two threads made a
    decode step of this model 3 s instead of 20 ms.
    """
    from backend.engines.llamacpp import LlamaCppEngine

    settings = BackendSettings(max_context_len=1024, max_batch_size=4, cpu_threads=1)
    engine = LlamaCppEngine(settings)
    engine.start()
    yield engine
    engine.shutdown()


@pytest.fixture(scope="session")
def neuronx() -> ModuleType:
    """The transformers-neuronx stand-in, importable as `transformers_neuronx`."""
    sys.path.insert(0, str(STAND_IN))
    return importlib.import_module("transformers_neuronx")


@pytest.fixture(scope="session")
def nxdi() -> ModuleType:
    """The NxD Inference stand-in, importable as `neuronx_distributed_inference`."""
    sys.path.insert(0, str(STAND_IN))
    return importlib.import_module("neuronx_distributed_inference")


@pytest.fixture
def make_runner(llamacpp_engine: LlamaCppEngine) -> Iterator[Callable[..., LlamaCppRunner]]:
    """Fresh runners (own llama.cpp contexts) on the engine's loaded model, or on `model`."""
    from backend.engines.llamacpp_runner import LlamaCppRunner

    runners: list[LlamaCppRunner] = []

    def make(
        n_seq_max: int = 6,
        n_ctx_seq: int = 1024,
        prefix_caching: bool = False,
        host_bytes: int = 0,
        n_threads: int = 1,
        model: LlamaModel | None = None,
    ) -> LlamaCppRunner:
        assert llamacpp_engine._llama is not None
        runner = LlamaCppRunner(
            model or llamacpp_engine._llama,
            n_seq_max,
            n_ctx_seq,
            n_threads=n_threads,
            prefix_caching=prefix_caching,
            host_cache_bytes=host_bytes,
        )
        runners.append(runner)
        return runner

    yield make
    for runner in runners:
        runner.close()


@pytest.fixture(scope="session")
def tiny_llama() -> Iterator[LlamaModel]:
    """A llama.cpp model of two tiny layers with the embedded model's vocabulary (`tiny_gguf`),
    written once into the suite's model cache (reading the vocabulary takes seconds)."""
    from backend.engines.cache_dir import write_atomically
    from backend.engines.embedded import embedded_gguf_path
    from backend.engines.llamacpp_runner import LlamaModel

    source = embedded_gguf_path()
    target = BackendSettings().cache_dir / f"tiny-llama-{source.stat().st_size}"
    if not (target / TINY).exists():
        write_atomically(target, lambda staging: write_tiny_llama(source, staging / TINY), TINY)
    model = LlamaModel(target / TINY)
    yield model
    model.close()
