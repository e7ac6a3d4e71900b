"""The engine registry: built-in engines and plugins found through entry points."""

from __future__ import annotations

import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest
import tomllib

from backend.engines.base import (
    BUILTIN_ENGINES,
    ENTRY_POINT_GROUP,
    available_engines,
    engine_class,
    register_engine,
    unregister_engine,
)
from tests.fakes import Script, scripted_engine

REPO = Path(__file__).resolve().parents[3]


def test_builtin_engine_is_imported_on_first_use() -> None:
    assert engine_class("hf").name == "hf"


def test_registered_engine_is_found_and_removed() -> None:
    engine = register_engine(scripted_engine(Script()))
    assert engine_class("scripted") is engine
    unregister_engine("scripted")
    with pytest.raises(ValueError, match="scripted"):
        engine_class("scripted")


def test_unknown_engine_says_how_to_fix() -> None:
    with pytest.raises(ValueError, match="set LLM_ENGINE to one of hf, llamacpp, neuron") as info:
        engine_class("tpu")
    assert ENTRY_POINT_GROUP in str(info.value)


def test_builtin_table_is_the_projects_own_entry_points() -> None:
    """The fallback for stale installed metadata says what pyproject.toml declares."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    assert project["entry-points"][ENTRY_POINT_GROUP] == BUILTIN_ENGINES


PLUGIN = """
from backend.engines.base import Engine


class ThirdPartyEngine(Engine):
    name = "thirdparty"
    model_id = "third-party-model"
    context_window = 16

    def start(self): pass
    def encode_chat(self, messages): return [1]
    def encode_text(self, text): return [1]
    def decode(self, token_ids): return ""
    def generate(self, prompt_ids, params): raise NotImplementedError
    def check_health(self): pass
    def shutdown(self): pass
"""


def install_plugin(root: Path, value: str) -> None:
    """A distribution as pip would install it: its module and a `*.dist-info` with entry points."""
    (root / "thirdparty_engine.py").write_text(textwrap.dedent(PLUGIN))
    info = root / "thirdparty_engine-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: thirdparty-engine\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text(f"[{ENTRY_POINT_GROUP}]\nthirdparty = {value}\n")


@pytest.fixture
def plugin_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    monkeypatch.syspath_prepend(str(tmp_path))
    yield tmp_path
    unregister_engine("thirdparty")
    sys.modules.pop("thirdparty_engine", None)


def test_third_party_engine_is_found_through_its_entry_point(plugin_dir: Path) -> None:
    """An installed distribution adds an engine without any call into the registry."""
    assert "thirdparty" not in available_engines()
    install_plugin(plugin_dir, "thirdparty_engine:ThirdPartyEngine")
    assert "thirdparty" in available_engines()
    assert "thirdparty_engine" not in sys.modules  # listed without importing it
    cls = engine_class("thirdparty")
    assert cls.__module__ == "thirdparty_engine" and cls.name == "thirdparty"
    assert engine_class("thirdparty") is cls


def test_entry_point_that_is_not_an_engine_is_refused(plugin_dir: Path) -> None:
    install_plugin(plugin_dir, "thirdparty_engine:PLUGIN_NOT_HERE")
    (plugin_dir / "thirdparty_engine.py").write_text("PLUGIN_NOT_HERE = 42\n")
    with pytest.raises(TypeError, match="not an Engine subclass"):
        engine_class("thirdparty")
