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
    # threads spin-wait for each other (see docs/development.md, llama.cpp). Steps of llama.cpp's
    # batch (512 tokens) rather than the default 32: the tier checks what requests get, not how
    # long a running stream waits while a prompt prefills (the quick tier's loop tests and the
    # bench's mixed row do). At 32, the Open WebUI replay's 6594-token prompt went in 31-token
    # steps for as long as the title task beside it sampled, which is anything up to its 1000.
    service = backend_service(
        free_port(),
        LLM_ENGINE="llamacpp",
        LLM_CPU_THREADS="1",
        LLM_MAX_CONTEXT_LEN=str(CONTEXT),
        LLM_MAX_NUM_BATCHED_TOKENS="512",
    )
    service.start()
    yield service
    service.kill()
