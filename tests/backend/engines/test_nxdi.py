"""The `nxdi` engine against a stand-in of NxD Inference 0.8 written from its source.

`tests/neuronx/neuronx_distributed_inference` mirrors the library's host-side rules (int32,
buckets, `seq_ids` order and padding of a decode batch, the KV row a call writes, the padded
positions of a prompt, compile and load) and computes every KV row's logits from what NxDI would
have written there, on a tiny Mistral checkpoint built in the test. The graphs themselves need
Inferentia2.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import tomllib
import torch
from transformers import AutoModelForCausalLM

from backend.engines.base import BUILTIN_ENGINES, engine_class
from backend.engines.neuron_common import length_buckets
from backend.engines.nxdi import NxdiEngine, NxdiSlotRunner
from backend.errors import EngineError
from backend.generation import Delta, SamplingParams
from backend.protocol import ChatCompletionRequest
from backend.replica.model_server import ModelServer
from backend.settings import BackendSettings

REPO = Path(__file__).resolve().parents[3]
GREEDY = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
CONTEXT = 256


def settings(checkpoint: Path, **overrides: Any) -> BackendSettings:
    values: dict[str, Any] = {
        "engine": "nxdi",
        "model": str(checkpoint),
        "max_batch_size": 2,
        "max_context_len": CONTEXT,
    }
    return BackendSettings(**{**values, **overrides})


@pytest.fixture
def engine(mistral_checkpoint: Path, nxdi: Any) -> Iterator[NxdiEngine]:
    """Two slots: a decode of both is a full batch, which NxDI runs without reordering."""
    started = NxdiEngine(settings(mistral_checkpoint))
    started.start()
    yield started
    started.shutdown()


def runner_of(engine: NxdiEngine) -> NxdiSlotRunner:
    runner = engine._model().runner
    assert isinstance(runner, NxdiSlotRunner)
    return runner


def reference_logits(checkpoint: Path, tokens: list[int]) -> torch.Tensor:
    model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()
    with torch.inference_mode():
        return model(input_ids=torch.tensor([tokens])).logits[0, -1]


def close(row: torch.Tensor, expected: torch.Tensor) -> bool:
    return torch.allclose(row, expected, atol=1e-4)


def test_the_engine_registers_by_entry_point_and_table_without_the_sdk() -> None:
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    declared = pyproject["project"]["entry-points"]["mistral_chat.engines"]["nxdi"]
    assert declared == BUILTIN_ENGINES["nxdi"] == "backend.engines.nxdi:NxdiEngine"
    assert engine_class("nxdi") is NxdiEngine


def test_neuron_config_is_continuous_batching_with_logits(
    engine: NxdiEngine, caplog: pytest.LogCaptureFixture
) -> None:
    config = runner_of(engine)._model.neuron_config
    assert config.is_continuous_batching
    assert (config.ctx_batch_size, config.tkg_batch_size, config.kv_cache_batch_size) == (1, 2, 2)
    assert (config.tp_degree, config.torch_dtype) == (2, torch.bfloat16)
    assert config.enable_bucketing
    assert config.context_encoding_buckets == length_buckets(CONTEXT) == [128, 256]
    assert config.token_generation_buckets == length_buckets(CONTEXT)
    assert config.on_device_sampling_config is None
    # NxDI ignores a keyword it does not know with a warning: a misspelt one would do nothing.
    from neuronx_distributed_inference.models.config import NeuronConfig

    caplog.set_level(logging.WARNING)
    NeuronConfig(**engine.neuron_config(CONTEXT))
    assert "Unexpected keyword" not in caplog.text


def test_full_decode_batch_gives_each_sequence_its_own_logits(
    engine: NxdiEngine, mistral_checkpoint: Path
) -> None:
    """Both slots in one decode, named in descending order: NxDI runs a full batch as given
    (row i on KV row i), so the runner sorts by seq_id and restores the caller's order."""
    runner = runner_of(engine)
    prompts = {1: [1, 5, 6, 7, 8], 2: [1, 9, 10]}
    for seq_id, prompt in prompts.items():
        assert close(runner.prefill(seq_id, prompt), reference_logits(mistral_checkpoint, prompt))
    fed = {1: 11, 2: 12}
    rows = runner.decode([2, 1], [fed[2], fed[1]])
    for row, seq_id in zip(rows, [2, 1], strict=True):
        assert close(row, reference_logits(mistral_checkpoint, [*prompts[seq_id], fed[seq_id]]))


def test_partial_decode_batch_comes_back_in_the_callers_order(
    mistral_checkpoint: Path, nxdi: Any
) -> None:
    engine = NxdiEngine(settings(mistral_checkpoint, max_batch_size=4))
    engine.start()
    runner = runner_of(engine)
    prompts = {1: [1, 5, 6], 2: [1, 7, 8, 9], 3: [1, 10, 11, 12, 13]}
    for seq_id, prompt in prompts.items():
        runner.prefill(seq_id, prompt)
    rows = runner.decode([3, 1, 2], [20, 21, 22])
    for row, (seq_id, fed) in zip(rows, [(3, 20), (1, 21), (2, 22)], strict=True):
        assert close(row, reference_logits(mistral_checkpoint, [*prompts[seq_id], fed]))
    engine.shutdown()


def test_a_live_slot_left_out_of_a_decode_call_loses_its_cache(engine: NxdiEngine) -> None:
    """NxDI fills a missing slot with the first row's token at the first row's position; the
    runner's contract (every live slot, every step) is what keeps slots whole."""
    runner = runner_of(engine)
    runner.prefill(1, [1, 5, 6])
    runner.prefill(2, [1, 8, 9, 10, 11])
    together = runner.decode([1, 2], [12, 13])[1]
    runner.reset()
    runner.prefill(1, [1, 5, 6])
    runner.prefill(2, [1, 8, 9, 10, 11])
    runner.decode([1], [12])  # writes 12 at position 3 of slot 2's row too
    ruined = runner.decode([2], [13])[0]
    assert not close(ruined, together)


def test_a_one_token_prompt_is_refused_because_nxdi_reads_a_pads_logits(
    engine: NxdiEngine, mistral_checkpoint: Path
) -> None:
    model = runner_of(engine)._model
    ids = torch.tensor([[1]], dtype=torch.int32)
    output = model(input_ids=ids, position_ids=torch.zeros_like(ids), seq_ids=ids[0] * 0)
    assert close(output.logits[0, -1], reference_logits(mistral_checkpoint, [1, 0]))
    with pytest.raises(EngineError, match="two tokens"):
        runner_of(engine).prefill(3, [1])


def test_the_graphs_take_int32_and_nxdi_converts_int64_only(engine: NxdiEngine) -> None:
    model = runner_of(engine)._model
    ids = torch.tensor([[1, 5, 6]])
    positions = torch.arange(3).unsqueeze(0)
    model(input_ids=ids, position_ids=positions, seq_ids=torch.tensor([0]))  # int64: converted
    with pytest.raises(RuntimeError, match="int32"):
        model(input_ids=ids, position_ids=positions.float(), seq_ids=torch.tensor([0]))


def test_prompt_and_positions_fill_the_window_and_no_further(engine: NxdiEngine) -> None:
    """Prompts up to `max_context_length` and positions below `seq_len` are what the engine
    compiles for: the whole context window."""
    runner = runner_of(engine)
    runner.prefill(1, [1] + [5] * (CONTEXT - 2))
    runner.decode([1], [6])  # position CONTEXT - 1, the cache's last
    with pytest.raises(IndexError, match="past the KV cache"):
        runner.decode([1], [7])  # position CONTEXT: a bucket takes it, the cache has no room
    runner.reset()
    model = runner._model
    ids = torch.ones((1, CONTEXT + 1), dtype=torch.int32)
    positions = torch.arange(CONTEXT + 1, dtype=torch.int32).unsqueeze(0)
    with pytest.raises(ValueError, match="exceeds largest bucket"):
        model(input_ids=ids, position_ids=positions, seq_ids=torch.tensor([0]))


def standalone(engine: NxdiEngine, checkpoint: Path, target: Path, **neuron_config: Any) -> Any:
    """A stand-in model compiled and loaded outside the engine, with other NeuronConfig values."""
    from neuronx_distributed_inference.models.config import NeuronConfig
    from neuronx_distributed_inference.models.llama.modeling_llama import (
        LlamaInferenceConfig,
        NeuronLlamaForCausalLM,
    )
    from neuronx_distributed_inference.utils.hf_adapter import load_pretrained_config

    config = LlamaInferenceConfig(
        NeuronConfig(**{**engine.neuron_config(CONTEXT), **neuron_config}),
        load_config=load_pretrained_config(str(checkpoint)),
        rope_theta=10000.0,
    )
    NeuronLlamaForCausalLM(str(checkpoint), config).compile(str(target))
    model = NeuronLlamaForCausalLM(str(target))
    model.load(str(target))
    return model


def test_on_device_sampling_would_hide_the_logits(
    engine: NxdiEngine, mistral_checkpoint: Path, tmp_path: Path
) -> None:
    """With an `OnDeviceSamplingConfig` NxDI returns tokens and `logits=None`: the engine
    leaves it off so the loop's sampler (grammars, penalties, logprobs) sees the logits."""
    assert not runner_of(engine)._model.on_device_sampling
    sampling = standalone(
        engine, mistral_checkpoint, tmp_path, on_device_sampling_config={"top_k": 1}
    )
    ids = torch.tensor([[1, 5, 6]], dtype=torch.int32)
    positions = torch.arange(3, dtype=torch.int32).unsqueeze(0)
    output = sampling(input_ids=ids, position_ids=positions, seq_ids=torch.tensor([0]))
    assert output.logits is None and output.tokens.shape == (1, 1)


def test_without_continuous_batching_a_prompt_lands_in_the_first_row(
    engine: NxdiEngine, mistral_checkpoint: Path, tmp_path: Path
) -> None:
    """kv_cache_manager.py: only `is_continuous_batching` writes a prompt into its seq_id's
    row; without it slot 1's prompt overwrites slot 0's."""
    plain = standalone(engine, mistral_checkpoint, tmp_path, is_continuous_batching=False)
    runner = NxdiSlotRunner(plain, slots=2, window=CONTEXT)
    runner.prefill(1, [1, 5, 6, 7])
    runner.prefill(2, [1, 8, 9])
    row = runner.decode([1, 2], [10, 11])[0]
    assert not close(row, reference_logits(mistral_checkpoint, [1, 5, 6, 7, 10]))


def test_rope_theta_is_passed_because_nxdi_reads_it_as_an_attribute(
    mistral_checkpoint: Path, nxdi: Any, engine: NxdiEngine
) -> None:
    from neuronx_distributed_inference.models.config import NeuronConfig
    from neuronx_distributed_inference.models.llama.modeling_llama import LlamaInferenceConfig
    from neuronx_distributed_inference.utils.hf_adapter import load_pretrained_config

    with pytest.raises(AssertionError, match=r"Config must define \['rope_theta'\]"):
        LlamaInferenceConfig(
            NeuronConfig(), load_config=load_pretrained_config(str(mistral_checkpoint))
        )
    assert runner_of(engine)._model.config.rope_theta == 10000.0  # the checkpoint's


async def test_batched_streams_equal_single_streams(engine: NxdiEngine) -> None:
    prompts = [engine.encode_chat([{"role": "user", "content": q}]) for q in ("Hi", "Count")]

    async def reply(prompt: list[int]) -> str:
        return "".join([d.text async for d in engine.generate(prompt, GREEDY)])

    alone = [await reply(p) for p in prompts]
    steps = engine.batcher.stats.decode_steps
    assert await asyncio.gather(*(reply(p) for p in prompts)) == alone
    assert engine.batcher.stats.decode_steps - steps < 2 * (GREEDY.max_tokens - 1)


async def test_n_choices_are_each_encoded_into_a_slot_and_logprobs_come_back(
    engine: NxdiEngine,
) -> None:
    prompt = engine.encode_chat([{"role": "user", "content": "Hi"}])
    alone = "".join([d.text async for d in engine.generate(prompt, GREEDY)])
    texts, logprobs = ["", ""], [0, 0]
    async for delta in engine.generate(prompt, replace(GREEDY, n=2, logprobs=2)):
        texts[delta.index] += delta.text
        logprobs[delta.index] += len(delta.logprobs)
    assert texts == [alone, alone]
    assert logprobs == [GREEDY.max_tokens] * 2


def test_a_json_schema_reply_follows_it(mistral_checkpoint: Path, nxdi: Any) -> None:
    schema = {
        "type": "object",
        "properties": {"name": {"type": "string", "maxLength": 8}},
        "required": ["name"],
        "additionalProperties": False,
    }
    request = ChatCompletionRequest(
        messages=[{"role": "user", "content": "Your name?"}],
        max_tokens=60,
        response_format={"type": "json_schema", "json_schema": {"name": "n", "schema": schema}},
    )
    server = ModelServer(settings(mistral_checkpoint))

    async def collect() -> str:
        await server.start()
        try:
            events = [event async for event in server.generate(request)]
        finally:
            server.shutdown()
        return "".join(event.text for event in events if isinstance(event, Delta))

    assert set(json.loads(asyncio.run(collect()))) == {"name"}


def compiles(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The paths NxDI compiled into from now on."""
    from neuronx_distributed_inference.models.model_base import NeuronBaseForCausalLM

    seen: list[str] = []
    original = NeuronBaseForCausalLM.compile

    def spy(self: Any, compiled_model_path: str) -> None:
        seen.append(compiled_model_path)
        original(self, compiled_model_path)

    monkeypatch.setattr(NeuronBaseForCausalLM, "compile", spy)
    return seen


def test_compile_is_published_once_and_loaded_on_the_next_start(
    mistral_checkpoint: Path, nxdi: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen = compiles(monkeypatch)
    artifacts = tmp_path / "artifacts"
    for _ in range(2):
        started = NxdiEngine(settings(mistral_checkpoint, neuron_artifacts_dir=artifacts))
        started.start()
        started.shutdown()
    assert len(seen) == 1  # the second start loaded what the first published
    [published] = [p for p in artifacts.iterdir() if not p.name.startswith(".")]
    assert {"compiled.json", "model.pt", "neuron_config.json"} <= {
        p.name for p in published.iterdir()
    }


def test_loading_broken_artifacts_fails_the_replica(
    mistral_checkpoint: Path, nxdi: Any, tmp_path: Path
) -> None:
    artifacts = tmp_path / "artifacts"
    first = NxdiEngine(settings(mistral_checkpoint, neuron_artifacts_dir=artifacts))
    first.start()
    first.shutdown()
    [published] = [p for p in artifacts.iterdir() if not p.name.startswith(".")]
    (published / "model.pt").unlink()  # e.g. a volume that lost a file
    broken = NxdiEngine(settings(mistral_checkpoint, neuron_artifacts_dir=artifacts))
    with pytest.raises(EngineError, match=r"Delete .* to compile again"):
        broken.start()


def test_artifacts_of_another_batch_size_are_not_loaded(
    mistral_checkpoint: Path, nxdi: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen = compiles(monkeypatch)
    artifacts = tmp_path / "artifacts"
    for batch in (2, 3):
        started = NxdiEngine(
            settings(mistral_checkpoint, neuron_artifacts_dir=artifacts, max_batch_size=batch)
        )
        started.start()
        assert runner_of(started)._model.neuron_config.tkg_batch_size == batch
        started.shutdown()
    assert len(seen) == 2


def test_nxdi_runs_a_full_decode_batch_in_row_order_whatever_the_seq_ids(
    engine: NxdiEngine, mistral_checkpoint: Path
) -> None:
    """Why the runner sorts: named [1, 0], row 0 still reads and writes KV row 0."""
    runner = runner_of(engine)
    runner.prefill(1, [1, 5, 6, 7])  # slot 0
    runner.prefill(2, [1, 8, 9])  # slot 1
    output = runner._model(
        input_ids=torch.tensor([[11], [10]], dtype=torch.int32),
        position_ids=torch.tensor([[3], [4]], dtype=torch.int32),
        seq_ids=torch.tensor([1, 0], dtype=torch.int32),
    )
    row = output.logits[0, -1]
    assert close(row, reference_logits(mistral_checkpoint, [1, 5, 6, 11]))  # slot 0's tokens


def test_the_stand_in_refuses_what_nxdi_refuses(
    engine: NxdiEngine, mistral_checkpoint: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from neuronx_distributed_inference.models.config import NeuronConfig
    from neuronx_distributed_inference.models.llama.modeling_llama import NeuronLlamaForCausalLM

    caplog.set_level(logging.WARNING)
    NeuronConfig(is_continous_batching=True)
    assert "Unexpected keyword arguments: {'is_continous_batching': True}" in caplog.text
    one_row = standalone(engine, mistral_checkpoint, tmp_path / "ctx2", ctx_batch_size=2)
    with pytest.raises(AssertionError, match="only supports single seq_id"):
        NxdiSlotRunner(one_row, slots=2, window=CONTEXT).prefill(1, [1, 5, 6])
    compiled = NeuronLlamaForCausalLM(str(tmp_path / "ctx2"))
    ids = torch.tensor([[1, 5]], dtype=torch.int32)
    with pytest.raises(RuntimeError, match="Forward called before load"):
        compiled(input_ids=ids, position_ids=ids * 0, seq_ids=ids[0, :1] * 0)
    other = type(compiled.config).load(str(tmp_path / "ctx2"))
    other.neuron_config.ctx_batch_size = 1
    with pytest.raises(RuntimeError, match="graphs of another configuration"):
        NeuronLlamaForCausalLM(str(tmp_path / "ctx2"), other).load(str(tmp_path / "ctx2"))
