"""What the loop needs of a model: `BatchRunner`, the protocol every engine's runner implements."""

from __future__ import annotations

from typing import ClassVar, Protocol

import torch


class SequencesFailed(Exception):
    """Raised by a runner when some sequences of a step cannot go on (their context is full)
    and it computed nothing for any of them: the executor ends those, the others go on."""

    def __init__(self, message: str, seq_ids: list[int]) -> None:
        super().__init__(message)
        self.seq_ids = seq_ids


class BatchRunner(Protocol):
    """A model that runs prefill and decode steps on a batch of sequences named by id."""

    # True: `prefill` may be called again for the same sequence with the next chunk of its
    # prompt. False: it gets the whole prompt in one call.
    chunked_prefill: ClassVar[bool]
    # True: it is a `MixedBatchRunner`, whose `step` computes decode tokens and prompt chunks of
    # many sequences in one forward pass. False: the executor calls `prefill` per chunk and
    # `decode` for the batch.
    mixed_batch: ClassVar[bool]
    # True: finished sequences' KV stays with the runner and `resume` reuses it. False: the loop
    # never calls `lookup` or `resume`, every prompt is prefilled from its first token.
    prefix_caching: bool
    # Sequences the runner holds at once: the loop runs at most this many.
    capacity: int
    # KV cells the running sequences share, in tokens (the scheduler admits and preempts by
    # it); None when each sequence has memory of its own (a fixed slot of the context).
    kv_tokens: int | None

    def lookup(self, prompt_ids: list[int]) -> int:
        """How many leading prompt tokens `resume` would find now (no side effect)."""
        ...

    def resume(self, seq_id: int, prompt_ids: list[int]) -> int:
        """Start a sequence from the longest prefix of `prompt_ids` the runner holds.

        Returns how many leading prompt tokens are already computed, at most `len(prompt_ids) - 1`
        (the last prompt token is always computed, for its logits); `prefill` gets the rest.
        """
        ...

    def prefill(self, seq_id: int, prompt_ids: list[int]) -> torch.Tensor:
        """Add (a chunk of) a sequence's prompt; return the logits ([vocab]) after its last token.

        `decode` is called only with sequences whose whole prompt has been prefilled.
        """
        ...

    def decode(self, seq_ids: list[int], token_ids: list[int]) -> torch.Tensor:
        """Feed one token per sequence; return next-token logits, [len(seq_ids), vocab].

        `seq_ids` is every sequence that has finished its prefill and not been released.
        """
        ...

    def fork(self, parent_id: int, child_id: int) -> bool:
        """Start `child_id` with a copy of everything `parent_id` holds (a prompt just prefilled,
        not yet decoding); False if this runner cannot copy KV, and then the loop prefills the
        child's prompt itself."""
        ...

    def release(self, seq_id: int) -> None:
        """Remove a finished sequence from the batch (a prefix-caching runner may keep its KV)."""
        ...

    def reset(self) -> None:
        """Forget every sequence (after a failed step)."""
        ...

    def kv_usage(self) -> float:
        """Share (0 to 1) of the KV cache holding running sequences' tokens (parked prefixes,
        which give way to new requests, count as free, as in vLLM's `kv_cache_usage_perc`)."""
        ...


class MixedBatchRunner(BatchRunner, Protocol):
    """A runner whose `mixed_batch` is True: decode tokens and prompt chunks in one pass."""

    def step(
        self, decodes: list[tuple[int, int]], chunks: list[tuple[int, list[int], bool]]
    ) -> torch.Tensor:
        """One forward pass (`mixed_batch` runners only): a token for each `(seq_id, token)` of
        `decodes` and each `(seq_id, prompt tokens, last)` chunk. Returns logits, a row per
        decode in order, then one per chunk whose `last` is True (the prompt is all in)."""
        ...
