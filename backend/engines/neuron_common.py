"""What the two Inferentia2 engines share (`neuron`: transformers-neuronx, `nxdi`: NxD Inference).

Both serve Mistral-7B-Instruct from a local checkpoint, compile one graph per length bucket, and
give every running sequence one KV-cache slot of a fixed batch (`SlotRunner`). Neither SDK is
imported here.
"""

from __future__ import annotations

import importlib.metadata
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, ClassVar

import torch

from backend.engines.runner_engine import LoadedModel, RunnerEngine
from backend.engines.slots import SlotTable
from backend.errors import EngineError

DEFAULT_MODEL = "mistralai/Mistral-7B-Instruct-v0.2"
DEFAULT_CONTEXT = 4096
# Smallest compiled bucket; both libraries pad a prompt up to the next bucket.
_MIN_BUCKET = 128
_HUB_FILES = ["*.json", "*.safetensors", "tokenizer.model"]


def length_buckets(context: int) -> list[int]:
    """Powers of two from 128 up to (and including) the context window."""
    buckets = [_MIN_BUCKET]
    while buckets[-1] < context:
        buckets.append(min(buckets[-1] * 2, context))
    return buckets


def local_checkpoint(model_id: str, cache_dir: Path) -> Path:
    """`model_id` itself if it is a directory, else its hub snapshot under `cache_dir`."""
    if Path(model_id).is_dir():
        return Path(model_id)
    from huggingface_hub import snapshot_download

    # The hub token comes from HF_TOKEN (the `hf-token` Secret in Kubernetes).
    target = cache_dir / model_id.replace("/", "--")
    return Path(snapshot_download(model_id, local_dir=target, allow_patterns=_HUB_FILES))


def installed_version(distribution: str) -> str:
    """The installed version of a distribution, for compile markers."""
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


class SlotRunner(ABC):
    """`BatchRunner` over a model compiled for continuous batching: one cache slot per sequence,
    the slot's index being the library's sequence id.

    Every live slot must be in every decode call (the libraries' decode graph writes every row
    of the batch), which is how `ContinuousBatcher` calls it.
    """

    # A prompt is encoded by one context-encoding call of its bucket.
    chunked_prefill: ClassVar[bool] = False
    # Context encoding and token generation are different compiled graphs: separate calls.
    mixed_batch: ClassVar[bool] = False
    # Every prompt is encoded from position 0 (the loop never calls `resume`).
    prefix_caching = False
    kv_tokens: int | None = None  # each slot has a window of its own

    def __init__(self, model: Any, slots: int, window: int) -> None:
        self._model = model
        self.capacity = slots
        self._window = window  # positions each slot's cache holds
        self.slots = SlotTable(slots)

    @abstractmethod
    def _forward(
        self, tokens: list[list[int]], positions: list[list[int]], slots: list[int]
    ) -> torch.Tensor:
        """One call of the model: a row of tokens at their positions per slot; a row of
        next-token logits per input row, in input order."""

    def lookup(self, prompt_ids: list[int]) -> int:
        """Nothing is ever reused."""
        return 0

    def resume(self, seq_id: int, prompt_ids: list[int]) -> int:
        """Nothing is ever reused: every prompt is encoded from position 0."""
        return 0

    def reset(self) -> None:
        """Free every slot."""
        self.slots.clear()

    @torch.inference_mode()
    def prefill(self, seq_id: int, prompt_ids: list[int]) -> torch.Tensor:
        """Encode the prompt into a free slot; returns the logits of its last token."""
        # One token goes wrong in both libraries: transformers-neuronx takes it down the decode
        # path (every slot rewritten), NxDI pads positions with 1 and reads the pad's logits.
        if len(prompt_ids) < 2:
            raise EngineError("A prompt needs at least two tokens.")
        slot = self.slots.least_recently_used()
        self.slots.lend(slot, seq_id)
        slot.tokens = list(prompt_ids)
        return self._forward([prompt_ids], [list(range(len(prompt_ids)))], [slot.index])[0]

    @torch.inference_mode()
    def decode(self, seq_ids: list[int], token_ids: list[int]) -> torch.Tensor:
        """One token for every live slot; logits come back in `seq_ids` order."""
        lent = self.slots.lent()
        slots = [lent[s] for s in seq_ids]
        logits = self._forward(
            [[token] for token in token_ids],
            [[len(slot.tokens)] for slot in slots],
            [slot.index for slot in slots],
        )
        for slot, token in zip(slots, token_ids, strict=True):
            slot.tokens.append(token)
        return logits

    def fork(self, parent_id: int, child_id: int) -> bool:
        """Not supported: the model is only driven through its forward call (context encoding
        and decoding), which has no copy of one slot's cache to another, so each choice's
        prompt is encoded into its own slot."""
        return False

    def kv_usage(self) -> float:
        """Running sequences' positions over every slot's window."""
        return self.slots.usage(self._window)

    def release(self, seq_id: int) -> None:
        """Free the slot; stale cache is masked by position and overwritten by its next user."""
        slot = self.slots.give_back(seq_id)
        if slot is not None:
            slot.tokens.clear()


class CompiledNeuronEngine(RunnerEngine):
    """An engine whose model is compiled for Inferentia2 from a local Mistral checkpoint and
    runs in a `SlotRunner`: subclasses compile or load it (`_compiled_model`)."""

    runner_class: ClassVar[type[SlotRunner]]

    def _load(self) -> LoadedModel:
        from transformers import AutoTokenizer

        self._check_environment()
        model_id = self.settings.model or DEFAULT_MODEL
        path = local_checkpoint(model_id, self.settings.cache_dir)
        context = self.settings.max_context_len or DEFAULT_CONTEXT
        model = self._compiled_model(path, context)
        tokenizer = AutoTokenizer.from_pretrained(path)
        return LoadedModel(
            model_id=model_id,
            tokenizer=tokenizer,
            runner=self.runner_class(model, self.settings.max_batch_size, context),
            context_window=context,
            eos_ids=frozenset({tokenizer.eos_token_id}),
        )

    def _check_environment(self) -> None:
        """Refuse, before anything loads, what the library would silently get wrong."""

    @abstractmethod
    def _compiled_model(self, path: Path, context: int) -> Any:
        """The model compiled for `context` positions, ready to run."""
