"""Every test runs in exactly one tier: the `e2e` marker and `tests/e2e/` agree."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import pytest

from tests.conftest import check_tiers

E2E = Path("/repo/tests/e2e")


@dataclass
class Item:
    """What `check_tiers` reads of a pytest item."""

    nodeid: str
    path: Path
    e2e: bool

    def get_closest_marker(self, name: str) -> object | None:
        return object() if name == "e2e" and self.e2e else None


def items(*found: Item) -> list[pytest.Item]:
    return cast(Any, list(found))


def test_marked_tests_in_the_e2e_directory_and_unmarked_ones_elsewhere_pass() -> None:
    check_tiers(
        items(
            Item("e2e/test_a.py::t", E2E / "test_a.py", e2e=True),
            Item("backend/test_b.py::t", E2E.parent / "backend" / "test_b.py", e2e=False),
        ),
        E2E,
    )


@pytest.mark.parametrize(
    "stray",
    [
        Item("e2e/test_a.py::unmarked", E2E / "test_a.py", e2e=False),
        Item("backend/test_b.py::marked", E2E.parent / "backend" / "test_b.py", e2e=True),
    ],
    ids=["unmarked in e2e", "marked elsewhere"],
)
def test_a_test_on_the_wrong_side_of_the_line_stops_the_run(stray: Item) -> None:
    with pytest.raises(pytest.UsageError, match=stray.nodeid.replace("[", r"\[")):
        check_tiers(items(stray), E2E)
