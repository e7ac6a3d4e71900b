"""The engine interface every model back end implements, and the registry that names them.

An engine owns one model: it turns chat messages into prompt tokens with the model's own chat
template and streams generated text as `Delta`s. Engines are looked up by name (`LLM_ENGINE`);
the built-in ones are imported only when asked for, so the Neuron SDK is never imported on a CPU.
"""

from __future__ import annotations

import importlib
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, ClassVar, TypeVar

from backend.generation import Delta, SamplingParams

if TYPE_CHECKING:
    from backend.settings import BackendSettings


class Engine(ABC):
    """One model behind one small interface: load, template, stream, health, shutdown."""

    name: ClassVar[str]

    def __init__(self, settings: BackendSettings) -> None:
        self.settings = settings

    @property
    @abstractmethod
    def model_id(self) -> str:
        """The model id reported by `/v1/models`."""

    @property
    @abstractmethod
    def context_window(self) -> int:
        """Tokens the model can attend to: prompt plus reply."""

    @abstractmethod
    def start(self) -> None:
        """Load the model (blocking); afterwards the engine serves requests."""

    @abstractmethod
    def encode_chat(self, messages: list[dict[str, str]]) -> list[int]:
        """Prompt token ids for a conversation, ready for the assistant's reply."""

    @abstractmethod
    def generate(self, prompt_ids: list[int], params: SamplingParams) -> AsyncIterator[Delta]:
        """Stream the reply; closing the iterator early cancels the request."""

    @abstractmethod
    def check_health(self) -> None:
        """Raise `EngineError` if the engine can no longer serve."""

    @abstractmethod
    def shutdown(self) -> None:
        """Release the model and stop background work."""


EngineT = TypeVar("EngineT", bound=type[Engine])

_REGISTRY: dict[str, type[Engine]] = {}
# Built-in engines, imported on first use.
_BUILTIN_MODULES = {"hf": "backend.engines.hf", "neuron": "backend.engines.neuron"}


def register_engine(cls: EngineT) -> EngineT:
    """Class decorator: make an engine available under its `name`."""
    _REGISTRY[cls.name] = cls
    return cls


def unregister_engine(name: str) -> None:
    """Remove a registered engine (tests register fakes and remove them)."""
    _REGISTRY.pop(name, None)


def engine_class(name: str) -> type[Engine]:
    """The engine class registered as `name`, importing a built-in one on first use."""
    if name not in _REGISTRY and name in _BUILTIN_MODULES:
        importlib.import_module(_BUILTIN_MODULES[name])
    try:
        return _REGISTRY[name]
    except KeyError:
        known = ", ".join(sorted(set(_REGISTRY) | set(_BUILTIN_MODULES)))
        raise ValueError(f"Unknown engine {name!r}: set LLM_ENGINE to one of {known}.") from None
