"""The engine interface every model back end implements, and the registry that names them.

An engine owns one model: it turns chat messages into prompt tokens with the model's own chat
template and streams generated text as `Delta`s. Engines are looked up by name (`LLM_ENGINE`).

Engines are plugins: a distribution names its engine classes in the entry-point group
`mistral_chat.engines` (`name = "package.module:EngineClass"`), as this project does for its own
(`hf`, `llamacpp`, `neuron`, `nxdi`), so adding one needs no edit here. An engine's module is
imported only when that engine is asked for, so the Neuron SDK is never imported on a CPU.
`register_engine` adds a class directly (tests register fakes that way).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import AsyncGenerator
from importlib.metadata import EntryPoint, entry_points
from typing import TYPE_CHECKING, Any, ClassVar, TypeVar

from backend.generation import Delta, SamplingParams
from backend.tool_formats import NativeFormat

if TYPE_CHECKING:
    from backend.settings import BackendSettings


class Engine(ABC):
    """One model behind one small interface: load, template, stream, health, shutdown."""

    name: ClassVar[str]
    # Whether the engine can start a request from a prefix it still holds (`LLM_PREFIX_CACHING`):
    # then several replicas are worth routing by prefix.
    prefix_caching: ClassVar[bool] = False
    # The chat template's own tool-call format, once started (None: it has none we can read).
    tool_format: NativeFormat | None = None
    # Token ids the model knows, once started (None: the engine does not say).
    vocab_size: int | None = None

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
    def encode_chat(
        self, messages: list[dict[str, str]], tools: list[dict[str, Any]] | None = None
    ) -> list[int]:
        """Prompt token ids for a conversation, ready for the assistant's reply; `tools` (OpenAI
        `tools`) are given to a chat template that has a `tool_format`."""

    @abstractmethod
    def encode_text(self, text: str) -> list[int]:
        """Token ids of plain text (a completion's prompt), with the tokenizer's special
        tokens (BOS) as the model expects them."""

    @abstractmethod
    def decode(self, token_ids: list[int]) -> str:
        """The text of token ids, special tokens left out."""

    @abstractmethod
    def generate(
        self, prompt_ids: list[int], params: SamplingParams
    ) -> AsyncGenerator[Delta, None]:
        """Stream the reply (`params.n` choices, their deltas tagged with `index`); closing the
        iterator early cancels the request."""

    @abstractmethod
    def check_health(self) -> None:
        """Raise `EngineError` if the engine can no longer serve."""

    @abstractmethod
    def shutdown(self) -> None:
        """Release the model and stop background work."""


EngineT = TypeVar("EngineT", bound=type[Engine])

ENTRY_POINT_GROUP = "mistral_chat.engines"
# The built-in engines as pyproject.toml declares them; also used when the installed metadata is
# older than the source (an editable install made before an engine was added).
BUILTIN_ENGINES = {
    "hf": "backend.engines.hf:HFEngine",
    "llamacpp": "backend.engines.llamacpp:LlamaCppEngine",
    "neuron": "backend.engines.neuron:NeuronEngine",
    "nxdi": "backend.engines.nxdi:NxdiEngine",
}

_REGISTRY: dict[str, type[Engine]] = {}


def register_engine(cls: EngineT) -> EngineT:
    """Class decorator: make an engine available under its `name`."""
    _REGISTRY[cls.name] = cls
    return cls


def unregister_engine(name: str) -> None:
    """Remove a registered engine (tests register fakes and remove them)."""
    _REGISTRY.pop(name, None)


def available_engines() -> list[str]:
    """Every engine name `engine_class` can resolve: registered, installed plugins, built-ins."""
    return sorted(set(_REGISTRY) | set(_engine_entry_points()))


def engine_class(name: str) -> type[Engine]:
    """The engine class named `name`: registered, else loaded from its entry point."""
    if name in _REGISTRY:
        return _REGISTRY[name]
    entry_point = _engine_entry_points().get(name)
    if entry_point is None:
        known = ", ".join(available_engines())
        raise ValueError(
            f"Unknown engine {name!r}: set LLM_ENGINE to one of {known} (or install a package "
            f"that declares one in the entry-point group {ENTRY_POINT_GROUP!r})."
        )
    loaded = entry_point.load()
    if not (isinstance(loaded, type) and issubclass(loaded, Engine)):
        raise TypeError(
            f"Entry point {name} = {entry_point.value!r} in group {ENTRY_POINT_GROUP!r} "
            "is not an Engine subclass."
        )
    _REGISTRY[name] = loaded
    return loaded


def _engine_entry_points() -> dict[str, EntryPoint]:
    """Installed plugins by name, over the built-in table (installed metadata wins)."""
    found = {
        name: EntryPoint(name=name, value=value, group=ENTRY_POINT_GROUP)
        for name, value in BUILTIN_ENGINES.items()
    }
    found.update((ep.name, ep) for ep in entry_points(group=ENTRY_POINT_GROUP))
    return found
