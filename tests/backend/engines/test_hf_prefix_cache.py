"""Prefix caching in `PaddedBatchRunner` (the `hf` engine) on the real embedded model."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
import torch
from transformers import PreTrainedModel

from backend.engines.embedded import load_embedded_model
from backend.engines.hf import HFEngine, PaddedBatchRunner
from backend.errors import EngineError
from backend.generation import Delta, SamplingParams
from backend.replica.executor import BatcherStats
from backend.replica.loop import ContinuousBatcher
from tests.backend.engines.test_hf import BATCH_TOLERANCE

# The resumed prompt's tail is computed in one call instead of as part of the whole prompt:
# matmuls of other shapes round differently, as in chunked prefill, so the same bound applies
# (BATCH_TOLERANCE, a mean |difference| over the vocabulary).
BUDGET = 64 * 2**20


def model_of(engine: HFEngine) -> PreTrainedModel:
    runner = engine._model().runner
    assert isinstance(runner, PaddedBatchRunner)
    return runner._model


def turn(
    runner: PaddedBatchRunner, seq_id: int, prompt: list[int], steps: int, partner: bool = False
) -> tuple[int, list[int], torch.Tensor]:
    """Resume, prefill the rest, decode greedily (beside a second sequence if `partner`, so the
    row is left-padded in the shared cache), release. Returns tokens resumed, reply, logits."""
    cached = runner.resume(seq_id, prompt) if runner.prefix_caching else 0
    logits = [runner.prefill(seq_id, prompt[cached:])]
    if partner:  # longer, so that this sequence's row is the padded one
        runner.prefill(seq_id + 1000, prompt + prompt[:8])
    reply: list[int] = []
    for _ in range(steps):
        reply.append(int(logits[-1].argmax()))
        ids, tokens = [seq_id], [reply[-1]]
        if partner:
            ids, tokens = [seq_id + 1000, seq_id], [1, reply[-1]]
        logits.append(runner.decode(ids, tokens)[-1])
    runner.release(seq_id)
    if partner:
        runner.release(seq_id + 1000)
    return cached, reply, torch.stack(logits)


def follow_up(engine: HFEngine, question: str, reply: list[int], then: str) -> list[int]:
    text = engine._model().tokenizer.decode(reply, skip_special_tokens=True)
    messages = [
        {"role": "user", "content": question},
        {"role": "assistant", "content": text},
        {"role": "user", "content": then},
    ]
    return engine.encode_chat(messages)


def test_a_follow_up_resumes_from_the_parked_row_and_matches_a_full_prefill(
    hf_engine: HFEngine,
) -> None:
    model = model_of(hf_engine)
    cached_runner = PaddedBatchRunner(model, 2, prefix_caching=True, host_cache_bytes=BUDGET)
    fresh = PaddedBatchRunner(model, 2, prefix_caching=False)
    question = "Tell me about the sea."
    first = hf_engine.encode_chat([{"role": "user", "content": question}])
    _, reply, _ = turn(cached_runner, 0, first, 10, partner=True)  # parked trimmed of padding
    prompt = follow_up(hf_engine, question, reply, "And the ships?")
    cached, _, resumed = turn(cached_runner, 1, prompt, 6)
    assert len(first) < cached < len(prompt)
    _, _, whole = turn(fresh, 0, prompt, 6)
    assert float((resumed - whole).float().abs().mean()) <= BATCH_TOLERANCE[model.dtype]
    assert len(fresh.parked) == 0


def test_an_edited_conversation_never_sees_the_old_suffix(hf_engine: HFEngine) -> None:
    model = model_of(hf_engine)
    runner = PaddedBatchRunner(model, 2, prefix_caching=True, host_cache_bytes=BUDGET)
    fresh = PaddedBatchRunner(model, 2, prefix_caching=False)
    texts = ["Name a color.", "Blue.", "Why is the sky blue? Answer in one long sentence."]
    roles = ["user", "assistant", "user"]

    def chat() -> list[dict[str, str]]:
        return [{"role": r, "content": t} for r, t in zip(roles, texts, strict=True)]

    original = hf_engine.encode_chat(chat())
    turn(runner, 0, original, 4, partner=True)
    texts[2] = "What is 2 + 2?"
    edited = hf_engine.encode_chat(chat())
    cached, _, resumed = turn(runner, 1, edited, 6)
    shared = next(i for i, (a, b) in enumerate(zip(original, edited, strict=False)) if a != b)
    assert cached == shared
    _, _, whole = turn(fresh, 0, edited, 6)
    assert float((resumed - whole).float().abs().mean()) <= BATCH_TOLERANCE[model.dtype]


def test_parked_rows_stay_within_the_byte_budget(hf_engine: HFEngine) -> None:
    model = model_of(hf_engine)
    prompts = [hf_engine.encode_chat([{"role": "user", "content": q}]) for q in ["Hi", "Bye"]]
    runner = PaddedBatchRunner(model, 2, prefix_caching=True, host_cache_bytes=BUDGET)
    turn(runner, 0, prompts[0], 4)
    one_row = runner.parked.nbytes
    small = PaddedBatchRunner(model, 2, prefix_caching=True, host_cache_bytes=one_row * 3 // 2)
    for i, prompt in enumerate(prompts):
        turn(small, i, prompt, 4)
    assert len(small.parked) == 1 and small.parked.nbytes <= small.parked.budget_bytes
    assert small.resume(5, prompts[1]) == len(prompts[1]) - 1  # the most recent stayed


def test_decode_refuses_a_batch_without_every_live_sequence(hf_engine: HFEngine) -> None:
    runner = PaddedBatchRunner(model_of(hf_engine), 2)
    runner.prefill(0, [1, 2, 3])
    runner.prefill(1, [4, 5])
    runner.decode([0, 1], [6, 7])
    with pytest.raises(EngineError, match="1 of the 2 live sequences"):
        runner.decode([1], [8])


async def test_short_of_kv_the_youngest_stream_waits_and_says_the_same(hf_engine: HFEngine) -> None:
    """Through the loop, in float32 (greedy replies compared): with KV for three prompts but
    not their replies, parked prefixes go first, then the youngest stream is preempted, waits
    for memory and is computed again; every reply is the one given with room to spare."""
    model = load_embedded_model(hf_engine.settings.cache_dir, torch.float32)[0].eval()
    loaded = hf_engine._model()
    questions = ["Name a color.", "What is 2 + 2?", "Tell me about the sea."]
    prompts = [hf_engine.encode_chat([{"role": "user", "content": q}]) for q in questions]
    params = SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True)

    async def replies(runner: PaddedBatchRunner) -> tuple[list[str], BatcherStats]:
        batcher = ContinuousBatcher(runner, loaded.tokenizer, loaded.eos_ids)
        batcher.start()
        texts = await asyncio.gather(*(text(batcher.stream(p, params)) for p in prompts))
        batcher.shutdown()
        return list(texts), batcher.stats

    expected, roomy = await replies(PaddedBatchRunner(model, 4, host_cache_bytes=BUDGET))
    # The three prompts are admitted (each with 16 cells of growth to spare, and 10 more) and
    # outgrow the rest long before their 40 tokens.
    budget = (sum(len(p) for p in prompts) + 3 * 16 + 10) * token_bytes(model)
    tight = PaddedBatchRunner(model, 4, host_cache_bytes=BUDGET, kv_budget_bytes=budget)
    with torch.inference_mode():
        tight.prefill(99, [1, 2, 3, 4])
    tight.release(99)
    assert len(tight.parked) == 1  # a parked prefix, to go first
    got, stats = await replies(tight)
    assert roomy.preemptions == 0 and stats.preemptions >= 1
    assert got == expected
    assert tight.parked.best([1, 2, 3, 4])[0] < 4 and tight.parked.nbytes <= budget


def token_bytes(model: PreTrainedModel) -> int:
    """One token's keys and values over every layer."""
    config = model.config
    head_dim = config.hidden_size // config.num_attention_heads
    per_layer = 2 * config.num_key_value_heads * head_dim * model.dtype.itemsize
    return config.num_hidden_layers * per_layer


async def text(deltas: AsyncIterator[Delta]) -> str:
    return "".join([d.text async for d in deltas])


def test_parked_prefixes_give_way_to_running_streams(
    hf_engine: HFEngine,
) -> None:
    model = model_of(hf_engine)
    # Room for two 10-token streams and their next token, but not also for 4 parked tokens.
    budget = 22 * token_bytes(model)
    runner = PaddedBatchRunner(model, 2, host_cache_bytes=BUDGET, kv_budget_bytes=budget)
    with torch.inference_mode():
        runner.prefill(9, [1, 2, 3, 4])
    runner.release(9)
    assert len(runner.parked) == 1 and runner.parked.nbytes == 4 * token_bytes(model)
    runner.prefill(1, list(range(10, 20)))
    runner.prefill(2, list(range(20, 30)))
    runner.decode([1, 2], [5, 6])  # the parked prefix gave way
    assert len(runner.parked) == 0
    assert runner.kv_tokens == 22  # the budget the loop's scheduler admits and preempts by
