"""The Neuron engine's slot bookkeeping, over a recording stand-in for the compiled model.

The Neuron kernels themselves need Inferentia2; this checks what we send them.
"""

from __future__ import annotations

import pytest
import torch

from backend.engines.base import engine_class
from backend.engines.neuron import NeuronSlotRunner, length_buckets
from backend.errors import EngineError

VOCAB = 11


class RecordingModel:
    """Records forward calls; returns logits [rows, vocab]."""

    def __init__(self) -> None:
        self.calls: list[tuple[list[list[int]], list[list[int]], list[int]]] = []

    def __call__(
        self, input_ids: torch.Tensor, cache_ids: torch.Tensor, start_ids: torch.Tensor
    ) -> torch.Tensor:
        assert cache_ids.dtype == start_ids.dtype == torch.int32
        self.calls.append((input_ids.tolist(), cache_ids.tolist(), start_ids.tolist()))
        return torch.zeros(input_ids.shape[0], VOCAB)


def test_prefill_writes_one_slot_and_decode_continues_each_position() -> None:
    model = RecordingModel()
    runner = NeuronSlotRunner(model, slots=2)
    runner.prefill(10, [5, 6, 7])
    runner.prefill(11, [8, 9])
    assert model.calls[0] == ([[5, 6, 7]], [[0, 1, 2]], [0])
    assert model.calls[1] == ([[8, 9]], [[0, 1]], [1])
    logits = runner.decode([11, 10], [1, 2])
    assert logits.shape == (2, VOCAB)
    assert model.calls[2] == ([[1], [2]], [[2], [3]], [1, 0])
    runner.decode([11, 10], [3, 4])
    assert model.calls[3][1] == [[3], [4]]


def test_released_slot_is_reused_and_a_full_batch_is_an_error() -> None:
    runner = NeuronSlotRunner(RecordingModel(), slots=1)
    runner.prefill(1, [1, 2])
    with pytest.raises(EngineError, match="batch is full"):
        runner.prefill(2, [1, 2])
    runner.release(1)
    runner.prefill(2, [3, 4])


def test_one_token_prompt_is_refused() -> None:
    with pytest.raises(EngineError, match="two tokens"):
        NeuronSlotRunner(RecordingModel(), slots=1).prefill(1, [1])


def test_buckets_cover_the_context_window() -> None:
    assert length_buckets(4096) == [128, 256, 512, 1024, 2048, 4096]
    assert length_buckets(3000) == [128, 256, 512, 1024, 2048, 3000]


def test_engine_registers_without_the_neuron_sdk() -> None:
    assert engine_class("neuron").name == "neuron"
