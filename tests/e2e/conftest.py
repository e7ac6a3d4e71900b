"""One real backend for the whole session, or for each xdist worker (Ray Serve + the embedded model
on the CPU)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from harness.services import BackendProcess, backend_service, free_port
from tests.e2e import CONTEXT


@pytest.fixture(scope="session")
def backend() -> Iterator[BackendProcess]:
    """The backend, started once (per worker); a test that stops it must start it again."""
    # One llama.cpp thread: the tests share two cores with Chromium and pytest, and llama.cpp's
    # threads spin-wait for each other (see docs/development.md, llama.cpp).
    service = backend_service(
        free_port(), LLM_ENGINE="llamacpp", LLM_CPU_THREADS="1", LLM_MAX_CONTEXT_LEN=str(CONTEXT)
    )
    service.start()
    yield service
    service.kill()
