"""The whole suite runs the same on any host: no `LLM_*`/`CHATUI_*` setting of the shell leaks in
(except `LLM_DTYPE`, to run the suite in each number format), and models are cached in the repo.
The files that take longest run first."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
_HONOURED = {"LLM_DTYPE"}
# The files that take longest, in the order xdist's workers should take them up (the Makefile
# turns xdist's own order, by number of tests, off): a long file started last would leave the
# other worker idle meanwhile. The rest keep their order.
LONGEST_FIRST = (
    "e2e/test_open_webui_replay.py",
    "e2e/test_chat_ui.py",
    "e2e/test_nxdi_stand_in.py",
    "e2e/test_prefix_routing.py",
    "e2e/test_cluster_settings.py",
    "backend/engines/test_llamacpp_prefix_cache.py",
    "backend/engines/test_llamacpp.py",
    "backend/engines/test_engine_properties.py",
    "backend/engines/test_hf_prefix_cache.py",
)

for _name in [n for n in os.environ if n.startswith(("LLM_", "CHATUI_")) and n not in _HONOURED]:
    del os.environ[_name]
os.environ["LLM_CACHE_DIR"] = str(REPO / ".cache" / "models")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Every test in one tier; the longest files first (a stable sort: each file's tests keep
    their order)."""
    tests = Path(__file__).parent
    check_tiers(items, tests / "e2e")

    def rank(item: pytest.Item) -> int:
        name = Path(os.path.relpath(item.path, tests)).as_posix()
        return LONGEST_FIRST.index(name) if name in LONGEST_FIRST else len(LONGEST_FIRST)

    items.sort(key=rank)


def check_tiers(items: list[pytest.Item], e2e_dir: Path) -> None:
    """The `e2e` marker and `tests/e2e/` go together: the quick tier does not even collect that
    directory (its clients take seconds to import) and the e2e tier collects only it, so a test
    on one side of the line and marked for the other would run in neither."""
    misplaced = [
        item.nodeid
        for item in items
        if (item.get_closest_marker("e2e") is not None) != item.path.is_relative_to(e2e_dir)
    ]
    if misplaced:
        raise pytest.UsageError(
            f"Tests marked e2e live in {e2e_dir}, and every test there is marked e2e: {misplaced}"
        )
