"""Imports run one way: the product imports no tooling, and the bench stands apart from the
tests (what both need lives in `harness/`)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def imported_packages(package: str) -> set[tuple[str, str]]:
    """(module file, top-level package) of every import in `package`."""
    found: set[tuple[str, str]] = set()
    for path in sorted((REPO / package).rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                names = [node.module]
            found |= {(str(path.relative_to(REPO)), name.split(".")[0]) for name in names}
    return found


@pytest.mark.parametrize(
    ("package", "forbidden"),
    [
        ("bench", {"tests"}),
        ("harness", {"tests", "bench"}),
        ("backend", {"tests", "bench", "harness", "chatui"}),
        ("chatui", {"tests", "bench", "harness", "backend"}),
    ],
)
def test_imports_run_one_way(package: str, forbidden: set[str]) -> None:
    wrong = sorted(
        f"{module} imports {top}" for module, top in imported_packages(package) if top in forbidden
    )
    assert wrong == []
