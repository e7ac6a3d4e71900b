"""The Neuron engine against a stand-in of transformers-neuronx written from its source.

`tests/neuronx/transformers_neuronx` mirrors the library's host-side rules (decode padding and
`scatter_`, 2-D prefill positions, logits row order, `from_pretrained` checks, save/load order)
and computes every slot's logits from what the library would have cached there, on a tiny
Mistral checkpoint built in the test. The Neuron kernels themselves need Inferentia2.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import AutoModelForCausalLM

from backend.engines.base import engine_class
from backend.engines.neuron import (
    PINNED_TRANSFORMERS,
    NeuronEngine,
    NeuronSlotRunner,
    check_transformers,
    length_buckets,
)
from backend.engines.neuron_artifacts import ArtifactStore
from backend.errors import EngineError
from backend.generation import SamplingParams
from backend.settings import BackendSettings

GREEDY = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)


def settings(checkpoint: Path, **overrides: Any) -> BackendSettings:
    """The engine on the tiny checkpoint; the stand-in computes with this machine's transformers."""
    values: dict[str, Any] = {
        "engine": "neuron",
        "model": str(checkpoint),
        "max_batch_size": 4,
        "max_context_len": 256,
        "neuron_transformers": ">=4.36",
    }
    return BackendSettings(**{**values, **overrides})


@pytest.fixture
def engine(mistral_checkpoint: Path, neuronx: Any) -> Iterator[NeuronEngine]:
    started = NeuronEngine(settings(mistral_checkpoint))
    started.start()
    yield started
    started.shutdown()


def model_of(engine: NeuronEngine) -> Any:
    return engine._model().runner._model


def reference_logits(checkpoint: Path, tokens: list[int]) -> torch.Tensor:
    model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()
    with torch.inference_mode():
        return model(input_ids=torch.tensor([tokens])).logits[0, -1]


def test_decode_sends_int64_so_the_library_can_pad_the_batch(engine: NeuronEngine) -> None:
    runner = engine._model().runner
    runner.prefill(1, [1, 5, 6, 7])
    runner.prefill(2, [1, 8, 9])
    logits = runner.decode([2, 1], [10, 11])  # int32 positions: scatter() raises here
    assert logits.shape == (2, model_of(engine).config.vocab_size)


def test_slots_decode_like_each_sequence_alone(
    engine: NeuronEngine, mistral_checkpoint: Path
) -> None:
    """Row order, positions and slots: each row is its own sequence's next-token logits."""
    runner = engine._model().runner
    prompts = {1: [1, 5, 6, 7, 8], 2: [1, 9, 10]}
    for seq_id, prompt in prompts.items():
        first = runner.prefill(seq_id, prompt)
        assert torch.allclose(first, reference_logits(mistral_checkpoint, prompt), atol=1e-4)
    fed = {1: 11, 2: 12}
    rows = runner.decode([2, 1], [fed[2], fed[1]])
    for row, seq_id in zip(rows, [2, 1], strict=True):
        expected = reference_logits(mistral_checkpoint, [*prompts[seq_id], fed[seq_id]])
        assert torch.allclose(row, expected, atol=1e-4)


def test_a_live_slot_left_out_of_a_decode_call_loses_its_cache(engine: NeuronEngine) -> None:
    """The library's rule that the runner's contract (every live slot, every step) guards."""
    runner = engine._model().runner
    runner.prefill(1, [1, 5, 6, 7])
    runner.prefill(2, [1, 8, 9])
    together = runner.decode([1, 2], [10, 11])[1]
    runner.reset()
    runner.prefill(1, [1, 5, 6, 7])
    runner.prefill(2, [1, 8, 9])
    runner.decode([1], [10])  # sequence 2's slot gets token 0 at position 0
    ruined = runner.decode([2], [11])[0]
    assert not torch.allclose(ruined, together, atol=1e-3)


def test_released_slot_is_reused_and_a_full_batch_is_an_error(engine: NeuronEngine) -> None:
    runner = NeuronSlotRunner(model_of(engine), slots=1, window=64)
    runner.prefill(1, [1, 2])
    with pytest.raises(EngineError, match="in use"):
        runner.prefill(2, [1, 2])
    runner.release(1)
    runner.prefill(2, [3, 4])


def test_one_token_prompt_is_refused(engine: NeuronEngine) -> None:
    """The library would take it down the decode path and overwrite every other slot."""
    with pytest.raises(EngineError, match="two tokens"):
        NeuronSlotRunner(model_of(engine), slots=1, window=64).prefill(1, [1])


async def test_batched_streams_equal_single_streams(engine: NeuronEngine) -> None:
    """Each slot's logits depend only on its own cache, so batching changes nothing."""
    prompts = [engine.encode_chat([{"role": "user", "content": q}]) for q in ("Hi", "Count", "Go")]

    async def reply(prompt: list[int]) -> str:
        return "".join([d.text async for d in engine.generate(prompt, GREEDY)])

    alone = [await reply(p) for p in prompts]
    steps = engine.batcher.stats.decode_steps
    assert await asyncio.gather(*(reply(p) for p in prompts)) == alone
    assert engine.batcher.stats.decode_steps - steps < 3 * (GREEDY.max_tokens - 1)


async def test_each_choice_is_encoded_into_its_own_slot(engine: NeuronEngine) -> None:
    """The runner cannot copy a slot's cache, so `n` choices are `n` prompts: greedy, they
    say what one request says."""
    prompt = engine.encode_chat([{"role": "user", "content": "Hi"}])
    alone = "".join([d.text async for d in engine.generate(prompt, GREEDY)])
    stats = engine.batcher.stats
    prefills, forks = stats.prefills, stats.forks
    texts = ["", ""]
    async for delta in engine.generate(prompt, replace(GREEDY, n=2)):
        texts[delta.index] += delta.text
    assert texts == [alone, alone]
    assert (stats.prefills - prefills, stats.forks - forks) == (2, 0)


def test_from_pretrained_gets_the_batch_size_of_the_shared_caches(
    mistral_checkpoint: Path, neuronx: Any
) -> None:
    """module.py `_sanity_check` asserts the two are equal; the engine passes both."""
    config = neuronx.NeuronConfig(
        continuous_batching=neuronx.ContinuousBatchingConfig(batch_size_for_shared_caches=4)
    )
    with pytest.raises(AssertionError, match="invalid batch_size_for_shared_caches"):
        neuronx.MistralForSampling.from_pretrained(
            str(mistral_checkpoint), batch_size=2, neuron_config=config
        )
    engine = NeuronEngine(settings(mistral_checkpoint, max_batch_size=3))
    engine.start()
    model = model_of(engine)
    assert model.batch_size == model.neuron_config.continuous_batching.max_num_seqs == 3
    assert model.compile_workers == engine.settings.neuron_compile_workers  # not one per graph
    engine.shutdown()


def compile_once(checkpoint: Path, artifacts: Path) -> Path:
    """Start and stop an engine that compiles into `artifacts`; the published directory."""
    first = NeuronEngine(settings(checkpoint, neuron_artifacts_dir=artifacts))
    first.start()
    assert model_of(first).compile_workers is not None  # compiled, nothing to load yet
    first.shutdown()
    [published] = [p for p in artifacts.iterdir() if not p.name.startswith(".")]
    return published


def test_compile_is_published_once_and_reused(
    mistral_checkpoint: Path, neuronx: Any, tmp_path: Path
) -> None:
    artifacts = tmp_path / "artifacts"
    published = compile_once(mistral_checkpoint, artifacts)
    assert (published / "compiled.json").is_file() and list(published.glob("*.neff"))
    second = NeuronEngine(settings(mistral_checkpoint, neuron_artifacts_dir=artifacts))
    second.start()
    assert model_of(second).compile_workers is None  # loaded, not compiled
    second.shutdown()


def test_artifacts_of_another_configuration_are_ignored_with_a_log_line(
    mistral_checkpoint: Path, neuronx: Any, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    artifacts = tmp_path / "artifacts"
    compile_once(mistral_checkpoint, artifacts)
    caplog.set_level(logging.INFO, logger="backend.engines.neuron_artifacts")
    other = settings(mistral_checkpoint, neuron_artifacts_dir=artifacts, max_batch_size=2)
    smaller = NeuronEngine(other)
    smaller.start()
    assert model_of(smaller).compile_workers is not None  # compiled its own, loaded nothing
    assert "compiled for another configuration" in caplog.text
    assert len([p for p in artifacts.iterdir() if not p.name.startswith(".")]) == 2
    smaller.shutdown()


def test_loading_broken_artifacts_fails_the_replica(
    mistral_checkpoint: Path, neuronx: Any, tmp_path: Path
) -> None:
    artifacts = tmp_path / "artifacts"
    published = compile_once(mistral_checkpoint, artifacts)
    next(published.glob("*.neff")).unlink()  # e.g. a volume that lost a file
    broken = NeuronEngine(settings(mistral_checkpoint, neuron_artifacts_dir=artifacts))
    with pytest.raises(EngineError, match=r"Delete .* to compile again"):
        broken.start()


def test_a_replica_waits_for_another_ones_compile(
    mistral_checkpoint: Path, neuronx: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(ArtifactStore, "poll_s", 0.05)  # 5 s between looks in production
    artifacts = tmp_path / "artifacts"
    gate = threading.Event()
    compiled: list[str] = []

    class SlowCompile(NeuronEngine):
        def _build(self, path: Path, context: int, load_from: Path | None) -> Any:
            if load_from is None:
                compiled.append(threading.current_thread().name)
                gate.wait(10)
            return super()._build(path, context, load_from)

    engines = [
        SlowCompile(settings(mistral_checkpoint, neuron_artifacts_dir=artifacts)) for _ in range(2)
    ]
    threads = [threading.Thread(target=e.start, name=f"replica-{i}") for i, e in enumerate(engines)]
    for thread in threads:
        thread.start()
    while not compiled:
        threading.Event().wait(0.01)
    threading.Event().wait(0.3)  # the other replica is waiting on the lock by now
    gate.set()
    for thread in threads:
        thread.join(30)
    assert len(compiled) == 1  # one compile; the other replica loaded what it published
    assert sorted(model_of(e).compile_workers is None for e in engines) == [False, True]
    for engine in engines:
        engine.shutdown()


@pytest.mark.parametrize("version", ["4.36.0", "4.47.1", PINNED_TRANSFORMERS])
def test_transformers_in_range_is_accepted(version: str) -> None:
    check_transformers(version, BackendSettings().neuron_transformers)


@pytest.mark.parametrize("version", ["4.35.2", "4.48.0", "5.24.0"])
def test_transformers_out_of_range_is_refused_with_the_reason(version: str) -> None:
    with pytest.raises(EngineError, match=r"rope_theta.*transformers=="):
        check_transformers(version, BackendSettings().neuron_transformers)


def test_engine_refuses_to_start_on_an_unchecked_transformers(
    mistral_checkpoint: Path, neuronx: Any
) -> None:
    engine = NeuronEngine(settings(mistral_checkpoint, neuron_transformers="<4.48"))
    with pytest.raises(EngineError, match=r"neuron engine needs <4\.48"):
        engine.start()


def test_buckets_cover_the_context_window() -> None:
    assert length_buckets(4096) == [128, 256, 512, 1024, 2048, 4096]
    assert length_buckets(3000) == [128, 256, 512, 1024, 2048, 3000]


def test_engine_registers_without_the_neuron_sdk() -> None:
    assert engine_class("neuron").name == "neuron"
