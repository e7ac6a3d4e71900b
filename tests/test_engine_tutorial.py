"""docs/engines.md stays true: its file blocks, written out as the distribution the tutorial
builds and installed by pip (its entry point as pip records it), make a runner that follows the
`BatchRunner` protocol and an engine that passes the tutorial's own tests in a fresh interpreter,
streaming through the real batching loop."""

from __future__ import annotations

import importlib
import inspect
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from backend.replica.runner import BatchRunner

REPO = Path(__file__).resolve().parents[1]
DOC = REPO / "docs" / "engines.md"
# ```python file=bigram_engine.py ... ```: blocks naming one file are its text, in order.
BLOCK = re.compile(r"^```\w+ file=(\S+)\n(.*?)^```$", re.MULTILINE | re.DOTALL)
MODULE, TESTS = "bigram_engine", "test_bigram_engine.py"
PROTOCOL_METHODS = [
    "lookup", "resume", "prefill", "decode", "fork", "release", "reset", "kv_usage"
]  # fmt: skip
PROTOCOL_ATTRIBUTES = ["chunked_prefill", "mixed_batch", "prefix_caching", "kv_tokens"]


def tutorial_files() -> dict[str, str]:
    files: dict[str, list[str]] = {}
    for name, body in BLOCK.findall(DOC.read_text()):
        files.setdefault(name, []).append(body)
    return {name: "\n\n".join(bodies) for name, bodies in files.items()}


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The distribution's directory, as the tutorial writes it."""
    root = tmp_path_factory.mktemp("bigram-engine")
    for name, text in tutorial_files().items():
        (root / name).write_text(text)
    return root


@pytest.fixture(scope="module")
def site(source: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A directory `pip install` put the distribution in (offline, with this environment's
    setuptools), to be put on the path."""
    target = tmp_path_factory.mktemp("site")
    pip = [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation"]
    subprocess.run([*pip, "--no-index", "--target", str(target), str(source)], check=True)
    return target


def test_the_tutorial_writes_a_module_its_tests_and_its_metadata() -> None:
    assert sorted(tutorial_files()) == [f"{MODULE}.py", "pyproject.toml", TESTS]


def test_the_tutorial_code_is_linted_and_formatted_as_the_projects(source: Path) -> None:
    # The project's settings, and the imports sorted as in the tutorial's own distribution.
    config = ["--config", str(REPO / "pyproject.toml")]
    for option in (f'known-first-party=["{MODULE}"]', 'known-third-party=["backend"]'):
        config += ["--config", f"lint.isort.{option}"]
    for command in (["check", "--no-cache"], ["format", "--check", "--no-cache"]):
        result = subprocess.run(
            [sys.executable, "-m", "ruff", *command, *config, str(source)],
            capture_output=True,
            text=True,
        )
        assert result.returncode == 0, result.stdout + result.stderr


def test_the_runner_follows_the_protocol_in_under_forty_lines(
    site: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.syspath_prepend(str(site))
    try:
        module = importlib.import_module(MODULE)
        (runner,) = [
            cls
            for cls in vars(module).values()
            if isinstance(cls, type) and cls.__module__ == MODULE and hasattr(cls, "prefill")
        ]
        for attribute in PROTOCOL_ATTRIBUTES:
            assert hasattr(runner, attribute), attribute
        for method in PROTOCOL_METHODS:
            expected = list(inspect.signature(getattr(BatchRunner, method)).parameters)
            assert list(inspect.signature(getattr(runner, method)).parameters) == expected, method
        assert len(inspect.getsource(runner).splitlines()) < 40
    finally:
        sys.modules.pop(MODULE, None)


def test_the_installed_engine_passes_the_tutorials_tests(
    source: Path, site: Path, tmp_path: Path
) -> None:
    """In a fresh interpreter, from a directory of its own: the engine's module is the installed
    one, and the server finds the engine only through the entry point pip recorded."""
    shutil.copy(source / TESTS, tmp_path)
    expected = len(re.findall(r"^def test_", (source / TESTS).read_text(), re.MULTILINE))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), str(REPO)])}
    pytest_ = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:asyncio"]
    result = subprocess.run(
        [*pytest_, TESTS], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"{expected} passed" in result.stdout, result.stdout
