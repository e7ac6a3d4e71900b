"""The engine registry."""

from __future__ import annotations

import pytest

from backend.engines.base import engine_class, register_engine, unregister_engine
from tests.fakes import Script, scripted_engine


def test_builtin_engine_is_imported_on_first_use() -> None:
    assert engine_class("hf").name == "hf"


def test_registered_engine_is_found_and_removed() -> None:
    engine = register_engine(scripted_engine(Script()))
    assert engine_class("scripted") is engine
    unregister_engine("scripted")
    with pytest.raises(ValueError, match="scripted"):
        engine_class("scripted")


def test_unknown_engine_says_how_to_fix() -> None:
    with pytest.raises(ValueError, match="set LLM_ENGINE to one of hf, neuron"):
        engine_class("tpu")
