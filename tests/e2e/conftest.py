"""One real backend for the whole session, or for each xdist worker (Ray Serve + the embedded model
on the CPU); the order the end-to-end files run in."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from harness.services import BackendProcess, backend_service, free_port
from tests.e2e import CONTEXT

# The files that take longest (a minute or half of one on 2 cores), in the order xdist's workers
# should take them up (`make test` turns xdist's own order, by number of tests, off): a long file
# started last would leave the other worker idle meanwhile. The rest follow in their own order.
LONGEST_FIRST = (
    "test_open_webui_replay.py",
    "test_chat_ui.py",
    "test_nxdi_stand_in.py",
    "test_prefix_routing.py",
    "test_cluster_settings.py",
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Longest files first (a stable sort: each file's tests keep their order)."""

    def rank(item: pytest.Item) -> int:
        name = item.path.name
        return LONGEST_FIRST.index(name) if name in LONGEST_FIRST else len(LONGEST_FIRST)

    items.sort(key=rank)


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
