"""The `hf` engine on the real embedded SmolLM2-135M-Instruct."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import torch

from backend.detokenizer import IncrementalDetokenizer
from backend.engines.base import SamplingParams
from backend.engines.hf import HFEngine, PaddedBatchRunner, pick_dtype

GREEDY = SamplingParams(max_tokens=24, temperature=0.0)


def chat(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


async def reply(engine: HFEngine, prompt_ids: list[int], params: SamplingParams) -> str:
    return "".join([d.text async for d in engine.generate(prompt_ids, params)])


def test_chat_template_comes_from_the_tokenizer(hf_engine: HFEngine) -> None:
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "Bye"},
    ]
    text = hf_engine._model().tokenizer.decode(hf_engine.encode_chat(messages))
    assert text == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
        "<|im_start|>assistant\nHello!<|im_end|>\n<|im_start|>user\nBye<|im_end|>\n"
        "<|im_start|>assistant\n"
    )


@pytest.mark.parametrize(
    "text", [" 안녕하세요! 반갑습니다.", "Party 🎉👩‍👩‍👧 time", "  leading spaces\n"]
)
def test_streamed_deltas_equal_the_full_decode(hf_engine: HFEngine, text: str) -> None:
    tokenizer = hf_engine._model().tokenizer
    ids = tokenizer.encode(text, add_special_tokens=False)
    detokenizer = IncrementalDetokenizer(tokenizer)
    deltas = [detokenizer.push(t) for t in ids] + [detokenizer.flush()]
    assert "".join(deltas) == tokenizer.decode(ids) == text
    assert all("\ufffd" not in d for d in deltas)


async def test_greedy_reply_matches_transformers_generate(hf_engine: HFEngine) -> None:
    prompt = hf_engine.encode_chat(chat("What is the capital of France?"))
    loaded = hf_engine._model()
    model = loaded.runner._model
    expected_ids = model.generate(
        torch.tensor([prompt]), max_new_tokens=GREEDY.max_tokens, do_sample=False
    )[0, len(prompt) :]
    expected = loaded.tokenizer.decode(expected_ids, skip_special_tokens=True)
    assert await reply(hf_engine, prompt, GREEDY) == expected
    assert "Paris" in expected


async def test_batched_streams_decode_exactly_like_single_streams(hf_engine: HFEngine) -> None:
    questions = ["Name a color.", "What is 2 + 2? Explain in detail, step by step.", "Hi!"]
    prompts = [hf_engine.encode_chat(chat(q)) for q in questions]
    alone = [await reply(hf_engine, p, GREEDY) for p in prompts]
    steps_before = hf_engine.batcher.stats.decode_steps
    together = await asyncio.gather(*(reply(hf_engine, p, GREEDY) for p in prompts))
    assert together == alone
    stats = hf_engine.batcher.stats
    assert stats.decode_steps - steps_before < sum(GREEDY.max_tokens for _ in prompts)


async def test_seed_makes_sampling_reproducible(hf_engine: HFEngine) -> None:
    prompt = hf_engine.encode_chat(chat("Tell me a story."))
    params = SamplingParams(max_tokens=16, temperature=1.0, top_p=0.9, seed=1234)
    first, second = await asyncio.gather(
        reply(hf_engine, prompt, params), reply(hf_engine, prompt, params)
    )
    assert first == second != ""


def test_runner_releases_rows_and_trims_padding(hf_engine: HFEngine) -> None:
    runner = PaddedBatchRunner(hf_engine._model().runner._model)
    runner.prefill(1, [1, 2, 3, 4, 5, 6])
    runner.prefill(2, [7, 8])
    assert runner._mask.tolist() == [[1] * 6, [0, 0, 0, 0, 1, 1]]
    logits = runner.decode([2, 1], [9, 10])
    assert logits.shape[0] == 2
    runner.release(1)
    assert runner._mask.tolist() == [[1, 1, 1]]  # the padding only row 1 needed is gone
    assert runner._kv()[0][0].shape[2] == 3
    runner.release(2)
    assert runner._order == []


def test_dtype_auto_follows_cpu_flags(tmp_path: Path) -> None:
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("flags : fpu avx2 avx512f amx_bf16\n")
    assert pick_dtype("auto", cpuinfo) == torch.bfloat16
    cpuinfo.write_text("flags : fpu avx2\n")
    assert pick_dtype("auto", cpuinfo) == torch.float32
    assert pick_dtype("float32", cpuinfo) == torch.float32
