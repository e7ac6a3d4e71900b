"""The `llamacpp` engine on the real embedded SmolLM2-135M-Instruct GGUF."""

from __future__ import annotations

import asyncio
import itertools
import random
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from backend.engines import llamacpp_runner
from backend.engines.embedded import EMBEDDED_MODEL_ID, embedded_gguf_path
from backend.engines.gguf_tokenizer import load_gguf_tokenizer, tokenizer_cache_dir
from backend.engines.hf import HFEngine
from backend.engines.llamacpp import LlamaCppEngine, check_vocab
from backend.engines.llamacpp_runner import LlamaCppRunner, LlamaModel, llama, model_params
from backend.errors import EngineError
from backend.generation import Delta, SamplingParams
from backend.replica.loop import ContinuousBatcher
from backend.replica.runner import SequencesFailed
from backend.settings import BackendSettings
from tests.backend.engines.llama_view import held_tokens, lent, pos_max, until

QUESTIONS = [
    "Name a color.",
    "What is 2 + 2? Explain in detail, step by step.",
    "Hi!",
    "Tell me a story about a dragon.",
    "Why is the sky blue?",
    "Count to ten.",
]
CONVERSATIONS = [
    [{"role": "user", "content": "Hi"}],
    [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi 안녕하세요 🎉👩‍👩‍👧"},
        {"role": "assistant", "content": "Hello!\n\n  How can I help?"},
        {"role": "user", "content": "Bye <|im_end|> not a token"},
    ],
    [{"role": "user", "content": "  leading spaces\nand\ttabs  "}],
]

# Decode steps, batched (1 to 6 sequences, rows in any order, joining and leaving) against each
# sequence alone: measured bit-identical (max |difference| 0.0 over 16 steps; logits reach ~32).
# llama.cpp computes every row of a small batch with the same per-row kernels. (Prefill chunks of
# several hundred tokens do take other paths: up to 0.84, see PREFILL_TOLERANCE.) The bound keeps
# room for rounding only; the smallest deviation of a broken runner measured is 1.0 (positions
# shifted by 5: RoPE is relative, so only rounding changes), the others 20 and more.
DECODE_TOLERANCE = 0.05
# Final prefill logits of one prompt given in chunks against the prompt in one call: 0.0 for a
# 46-token prompt split anywhere; up to 0.84 (mean 0.27) for a 334-token prompt with a chunk of
# 2 to 63 tokens (llama.cpp's kernels differ by rows per call), the greedy token unchanged. A
# chunk whose sequence lost the earlier chunks is off by 3.6 (46 tokens) to 11.7 (334).
PREFILL_TOLERANCE = 1.5


def chat(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


async def collect(deltas: AsyncIterator[Delta]) -> list[Delta]:
    return [d async for d in deltas]


async def reply(engine: LlamaCppEngine, prompt: list[int], params: SamplingParams) -> str:
    return "".join(d.text for d in await collect(engine.generate(prompt, params)))


def prompts(engine: LlamaCppEngine, n: int) -> list[list[int]]:
    return [engine.encode_chat(chat(q)) for q in QUESTIONS[:n]]


# --- prompts and vocabulary -----------------------------------------------------------------


@pytest.mark.parametrize("messages", CONVERSATIONS, ids=["one-turn", "multi-turn", "spaces"])
def test_prompt_tokens_equal_the_hf_engines(
    llamacpp_engine: LlamaCppEngine, hf_engine: HFEngine, messages: list[dict[str, str]]
) -> None:
    """The same conversation is the same prompt on both engines (the model's own template)."""
    ids = llamacpp_engine.encode_chat(messages)
    assert ids == hf_engine.encode_chat(messages)
    assert llamacpp_engine._model().tokenizer.decode(ids).endswith("<|im_start|>assistant\n")


def test_llama_cpp_and_the_tokenizer_agree_on_the_end_tokens(
    llamacpp_engine: LlamaCppEngine, hf_engine: HFEngine
) -> None:
    loaded, llama = llamacpp_engine._model(), llamacpp_engine._llama
    assert llama is not None
    tokenizer = loaded.tokenizer
    assert llama.n_vocab == len(tokenizer) == 49152
    assert hf_engine._model().eos_ids <= loaded.eos_ids  # and llama.cpp's other end tokens
    for token in loaded.eos_ids | {tokenizer.bos_token_id}:
        assert llama.token_text(token) == tokenizer.convert_ids_to_tokens(token)
    assert llama.token_text(tokenizer.eos_token_id) == "<|im_end|>"


def test_a_tokenizer_of_another_model_is_refused(
    llamacpp_engine: LlamaCppEngine, mistral_tokenizer: object
) -> None:
    assert llamacpp_engine._llama is not None
    with pytest.raises(EngineError, match="different models"):
        check_vocab(llamacpp_engine._llama, mistral_tokenizer)  # type: ignore[arg-type]


def test_the_gguf_tokenizer_is_converted_once(llamacpp_engine: LlamaCppEngine) -> None:
    gguf, cache = embedded_gguf_path(), llamacpp_engine.settings.cache_dir
    assert (tokenizer_cache_dir(gguf, cache) / "tokenizer_config.json").exists()
    start = time.monotonic()
    tokenizer = load_gguf_tokenizer(gguf, cache)
    assert time.monotonic() - start < 5  # reading it from the GGUF takes ~10 s
    assert tokenizer.chat_template == llamacpp_engine._model().tokenizer.chat_template


# --- the runner: batching, chunked prefill, memory -------------------------------------------


def teacher_forced_alone(
    runner: LlamaCppRunner, prompt: list[int], steps: int
) -> tuple[list[int], torch.Tensor]:
    """Greedy tokens of one sequence alone, and the logits before each of them."""
    logits = [runner.prefill(0, prompt)]
    tokens: list[int] = []
    for _ in range(steps):
        tokens.append(int(logits[-1].argmax()))
        logits.append(runner.decode([0], [tokens[-1]])[0])
    runner.release(0)
    return tokens, torch.stack(logits)


def shift_positions(runner: LlamaCppRunner, seq_id: int) -> None:
    """Broken on purpose: the sequence's positions start at 5 instead of 0."""
    runner.resume(seq_id, [1])
    slot = runner.slots.of(seq_id)
    assert slot is not None
    slot.tokens = [0] * 5


def swap_sequences(runner: LlamaCppRunner, a: int, b: int) -> None:
    """Broken on purpose: each of two sequences' tokens goes to the other's sequence id."""
    slot_a, slot_b = runner.slots.of(a), runner.slots.of(b)
    assert slot_a is not None and slot_b is not None
    runner.slots.lend(slot_b, a)
    runner.slots.lend(slot_a, b)


def batched_deviation(
    runner: LlamaCppRunner, prompts: list[list[int]], steps: int, fault: str | None = None
) -> list[float]:
    """Max |batched - alone| of every sequence's logits, teacher-forced with its greedy tokens.

    Two sequences start, the others join after two steps; rows go in a new order every step and
    each sequence leaves the batch when done, as the loop releases it.
    """
    alone = [teacher_forced_alone(runner, p, steps) for p in prompts]
    got: dict[int, list[torch.Tensor]] = {}
    for step in range(steps + 3):
        joining = range(2) if step == 0 else range(2, len(prompts)) if step == 2 else []
        for seq in joining:
            if fault == "positions" and seq == 1:
                shift_positions(runner, seq)
            got[seq] = [runner.prefill(seq, prompts[seq])]
        if fault == "seq ids" and step == 2:
            swap_sequences(runner, 2, 3)
        live = [s for s in got if len(got[s]) <= steps]
        random.Random(step).shuffle(live)
        if not live:
            break
        rows = runner.decode(live, [alone[s][0][len(got[s]) - 1] for s in live])
        if fault == "row order":
            rows = rows.flip(0)
        for seq, row in zip(live, rows, strict=True):
            got[seq].append(row)
            if len(got[seq]) > steps:
                runner.release(seq)
    assert lent(runner) == {}
    return [
        float((torch.stack(got[seq]) - reference).abs().max())
        for seq, (_, reference) in enumerate(alone)
    ]


def test_batched_decode_matches_each_sequence_alone(
    llamacpp_engine: LlamaCppEngine, make_runner: Callable[..., LlamaCppRunner]
) -> None:
    deviations = batched_deviation(make_runner(), prompts(llamacpp_engine, 6), steps=10)
    assert max(deviations) <= DECODE_TOLERANCE, deviations


@pytest.mark.parametrize("fault", ["positions", "seq ids", "row order"])
def test_a_broken_runner_exceeds_the_tolerance(
    llamacpp_engine: LlamaCppEngine, make_runner: Callable[..., LlamaCppRunner], fault: str
) -> None:
    """The tolerance is tight enough to see a wrong position, sequence id or row order."""
    deviations = batched_deviation(make_runner(), prompts(llamacpp_engine, 4), 6, fault)
    assert max(deviations) > 10 * DECODE_TOLERANCE, deviations


async def test_batched_greedy_reply_equals_the_reply_alone(llamacpp_engine: LlamaCppEngine) -> None:
    """Through the loop: four concurrent greedy streams say what each says alone."""
    params = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True)
    ps = prompts(llamacpp_engine, 4)
    alone = [await reply(llamacpp_engine, p, params) for p in ps]
    steps_before = llamacpp_engine.batcher.stats.decode_steps
    together = await asyncio.gather(*(reply(llamacpp_engine, p, params) for p in ps))
    assert list(together) == alone
    # Alone, four streams of 16 tokens take 60 decode steps (the first comes from prefill).
    assert llamacpp_engine.batcher.stats.decode_steps - steps_before < 60


@pytest.mark.parametrize(
    ("system_info", "extra_buffers"),
    [
        (b"CPU : AVX2 = 1 | AVX512 = 1 | AMX_INT8 = 1 | REPACK = 1 | ", False),
        (b"CPU : AVX2 = 1 | AVX512 = 1 | REPACK = 1 | ", True),
    ],
    ids=["amx-build", "other-build"],
)
def test_weights_never_go_to_amx_buffers(
    monkeypatch: pytest.MonkeyPatch, system_info: bytes, extra_buffers: bool
) -> None:
    # The real info of this build decides for the other tests; here both kinds are shown.
    monkeypatch.setattr(llamacpp_runner.llama, "llama_print_system_info", lambda: system_info)
    params = model_params()
    assert params.use_extra_bufts is extra_buffers and params.n_gpu_layers == 0


def test_runner_declares_chunked_prefill() -> None:
    assert LlamaCppRunner.chunked_prefill is True


@pytest.mark.parametrize("words", [8, 60], ids=["46 tokens", "334 tokens"])
def test_prefill_in_chunks_equals_prefill_in_one_call(
    llamacpp_engine: LlamaCppEngine, make_runner: Callable[..., LlamaCppRunner], words: int
) -> None:
    """Each call extends the sequence (positions continue); the logits follow its last chunk."""
    prompt = llamacpp_engine.encode_chat(chat("Tell me about " + "the sea and the ships " * words))
    runner = make_runner()
    whole = runner.prefill(0, prompt)
    cut = [0, 1, len(prompt) // 3, len(prompt) - 1, len(prompt)]
    for start, end in itertools.pairwise(cut):
        chunked = runner.prefill(1, prompt[start:end])
    slot = lent(runner)[1]
    assert pos_max(runner, slot) == pos_max(runner, lent(runner)[0]) == len(prompt) - 1
    assert float((chunked - whole).abs().max()) <= PREFILL_TOLERANCE
    assert int(chunked.argmax()) == int(whole.argmax())
    # Decoding on from either gives the same next step.
    token = int(whole.argmax())
    rows = runner.decode([0, 1], [token, token])
    assert float((rows[0] - rows[1]).abs().max()) <= PREFILL_TOLERANCE
    # Broken on purpose: a last chunk that does not see the earlier ones is far off.
    runner.release(1)
    lost = runner.prefill(2, prompt[len(prompt) // 3 :])
    assert float((lost - whole).abs().max()) > 2 * PREFILL_TOLERANCE


def test_a_step_goes_in_slot_order_and_answers_in_the_callers(
    llamacpp_engine: LlamaCppEngine, make_runner: Callable[..., LlamaCppRunner]
) -> None:
    """llama.cpp makes one ubatch of consecutive sequence ids: the batch goes in slot order
    whatever the plan's order, and each row still answers the sequence the caller put there."""
    batched, alone = make_runner(), make_runner()
    prompt = prompts(llamacpp_engine, 4)
    for runner in (batched, alone):
        for seq in range(3):
            runner.prefill(seq, prompt[seq])
    expected = [alone.decode([seq], [7])[0] for seq in range(3)]
    order = sorted(range(3), key=lambda seq: -lent(batched)[seq])  # against the slots' order
    chunk = prompt[3][:5]
    rows = batched.step([(seq, 7) for seq in order], [(3, chunk, True)])
    seq_ids = [batched._batch.seq_id[i][0] for i in range(len(order) + len(chunk))]
    assert seq_ids == sorted(seq_ids), seq_ids
    assert rows.shape[0] == len(order) + 1
    for row, seq in zip(rows, order, strict=False):
        assert float((row - expected[seq]).abs().max()) <= DECODE_TOLERANCE, seq
    assert float((rows[-1] - alone.prefill(3, chunk)).abs().max()) <= PREFILL_TOLERANCE


def test_release_removes_the_sequence_and_frees_its_capacity(
    llamacpp_engine: LlamaCppEngine, make_runner: Callable[..., LlamaCppRunner]
) -> None:
    runner = make_runner(n_seq_max=2, n_ctx_seq=256)
    prompt = prompts(llamacpp_engine, 1)[0]
    runner.prefill(10, prompt)
    runner.prefill(11, prompt[:5])
    first = lent(runner)[10]
    assert pos_max(runner, first) == len(prompt) - 1
    with pytest.raises(EngineError, match="in use"):
        runner.prefill(12, prompt)
    runner.release(10)
    assert pos_max(runner, first) == -1 and 10 not in lent(runner)
    runner.release(10)  # twice, or an unknown id: nothing happens
    # The freed sequence id serves a new sequence from position 0, with no trace of the old one.
    fresh = runner.prefill(12, prompt)
    assert lent(runner)[12] == first and pos_max(runner, first) == len(prompt) - 1
    runner.reset()
    assert lent(runner) == {} and pos_max(runner, first) == pos_max(runner, 1 - first) == -1
    assert float((runner.prefill(13, prompt) - fresh).abs().max()) == 0.0


def test_a_sequence_cannot_outgrow_its_window(
    llamacpp_engine: LlamaCppEngine, make_runner: Callable[..., LlamaCppRunner]
) -> None:
    runner = make_runner(n_seq_max=1, n_ctx_seq=256)
    assert runner.n_ctx_seq == 256
    with pytest.raises(SequencesFailed, match="context window"):
        runner.prefill(0, [1] * 257)
    runner.prefill(1, [1] * 255)
    runner.decode([1], [1])  # position 255, the last cell
    with pytest.raises(SequencesFailed, match="context window") as refused:
        runner.decode([1], [1])
    assert refused.value.seq_ids == [1]


async def test_a_cancelled_stream_frees_its_slot_and_parks_its_kv(
    llamacpp_engine: LlamaCppEngine,
) -> None:
    runner = llamacpp_engine._runner
    assert runner is not None
    await until(lambda: llamacpp_engine.batcher.occupancy() == (0, 0))  # earlier tests' streams
    assert lent(runner) == {}
    prompt = prompts(llamacpp_engine, 1)[0]
    stream = llamacpp_engine.generate(prompt, SamplingParams(max_tokens=1000, ignore_eos=True))
    await anext(stream)
    (slot,) = lent(runner).values()
    assert pos_max(runner, slot) >= len(prompt) - 1
    await until(lambda: llamacpp_engine.batcher.occupancy() == (1, 0))
    await stream.aclose()  # the client has gone
    await until(lambda: llamacpp_engine.batcher.occupancy() == (0, 0))  # after its release
    # The slot is free; its KV stays parked for a prompt that begins the same way.
    held = held_tokens(runner)[slot]
    assert lent(runner) == {} and held[: len(prompt)] == prompt
    assert pos_max(runner, slot) == len(held) - 1
    params = SamplingParams(max_tokens=4, ignore_eos=True)
    deltas = await collect(llamacpp_engine.generate(prompt, params))
    assert sum(d.tokens for d in deltas) == 4 and deltas[0].cached_tokens == len(prompt) - 1


# --- the engine -------------------------------------------------------------------------------


async def test_stop_strings_and_seeds_behave_as_on_every_engine(
    llamacpp_engine: LlamaCppEngine,
) -> None:
    prompt = llamacpp_engine.encode_chat(chat("Tell me a story."))
    params = SamplingParams(max_tokens=24, temperature=1.0, top_p=0.9, seed=7, ignore_eos=True)
    first = await reply(llamacpp_engine, prompt, params)
    assert await reply(llamacpp_engine, prompt, params) == first
    greedy = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)
    text = await reply(llamacpp_engine, prompt, greedy)
    stop = text[len(text) // 2 : len(text) // 2 + 3]
    stop_params = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True, stop=[stop])
    deltas = await collect(llamacpp_engine.generate(prompt, stop_params))
    assert "".join(d.text for d in deltas) == text[: text.index(stop)]
    assert deltas[-1].finish_reason == "stop"


def test_engine_reports_the_embedded_model_and_its_window(llamacpp_engine: LlamaCppEngine) -> None:
    assert llamacpp_engine.model_id == EMBEDDED_MODEL_ID
    assert llamacpp_engine.context_window == 1024  # LLM_MAX_CONTEXT_LEN of the fixture
    runner = llamacpp_engine._runner
    assert runner is not None and runner.capacity == 4 and runner.n_ctx_seq >= 1024


def test_model_may_name_any_local_gguf(tmp_path: Path, llamacpp_engine: LlamaCppEngine) -> None:
    gguf = tmp_path / "my-model.Q4_1.gguf"
    gguf.symlink_to(embedded_gguf_path())
    settings = llamacpp_engine.settings.model_copy(
        update={"model": str(gguf), "max_batch_size": 1, "max_context_len": 256}
    )
    engine = LlamaCppEngine(settings)
    start = time.monotonic()
    engine.start()
    try:
        assert time.monotonic() - start < 10  # no conversion of the weights
        assert engine.model_id == "my-model.Q4_1" and engine.context_window == 256
        assert engine.encode_chat(chat("Hi")) == llamacpp_engine.encode_chat(chat("Hi"))
    finally:
        engine.shutdown()


@pytest.mark.parametrize("model", ["HuggingFaceTB/SmolLM2-135M-Instruct", "missing.gguf"])
def test_model_that_is_not_a_local_gguf_is_refused(model: str) -> None:
    with pytest.raises(EngineError, match=r"not a local \.gguf file"):
        LlamaCppEngine(BackendSettings(model=model)).start()


def test_a_file_llama_cpp_cannot_read_is_refused(tmp_path: Path) -> None:
    bogus = tmp_path / "bogus.gguf"
    bogus.write_bytes(b"not a model")
    with pytest.raises(EngineError, match="could not load"):
        LlamaModel(bogus)


def test_a_forked_sequence_continues_from_its_parents_prompt(
    llamacpp_engine: LlamaCppEngine, make_runner: Callable[..., LlamaCppRunner]
) -> None:
    """`fork` copies the prompt's KV into another slot (replacing what that slot held): the
    child's next step equals the parent's and a fresh prefill's, and then each goes its own way."""
    runner, fresh = make_runner(n_seq_max=2, prefix_caching=True), make_runner(n_seq_max=1)
    other = llamacpp_engine.encode_chat(chat("Tell me about the sea, in many words."))
    runner.prefill(7, other)
    runner.release(7)  # its slot keeps that conversation: the child will take that slot
    prompt = llamacpp_engine.encode_chat(chat("Name three colors."))
    token = int(runner.prefill(0, prompt).argmax())
    assert runner.fork(0, 1)
    assert lent(runner)[1] != lent(runner)[0]
    same = runner.decode([0, 1], [token, token])
    expected = fresh.prefill(0, [*prompt, token])
    assert float((same[0] - same[1]).abs().max()) <= DECODE_TOLERANCE
    assert float((same[1] - expected).abs().max()) <= PREFILL_TOLERANCE
    first, second = (int(t) for t in same[1].topk(2).indices)
    apart = runner.decode([0, 1], [first, second])
    assert float((apart[1] - fresh.decode([0], [second])[0]).abs().max()) <= PREFILL_TOLERANCE
    assert pos_max(runner, lent(runner)[1]) == len(prompt) + 1  # its own cells, none of `other`


def queue_forks_with_seq_cp(runner: LlamaCppRunner, monkeypatch: pytest.MonkeyPatch) -> None:
    """Broken on purpose: `fork` by `llama_memory_seq_cp`, whose copy across streams waits for
    the next decode (llama_kv_cache::seq_cp), with nothing keeping slots away from it meanwhile."""

    def fork(parent_id: int, child_id: int) -> bool:
        parent = runner.slots.of(parent_id)
        assert parent is not None
        slot = runner.slots.least_recently_used()
        runner._save(slot)
        runner._trim(slot, 0)
        llama.llama_memory_seq_cp(runner._memory, parent.index, slot.index, -1, -1)
        slot.tokens = list(parent.tokens)
        runner.slots.lend(slot, child_id)
        return True

    monkeypatch.setattr(runner, "fork", fork)


@pytest.mark.parametrize("fault", [None, "queued copy"])
def test_a_slot_saved_and_restored_right_after_a_fork_holds_its_own_kv(
    llamacpp_engine: LlamaCppEngine,
    make_runner: Callable[..., LlamaCppRunner],
    monkeypatch: pytest.MonkeyPatch,
    fault: str | None,
) -> None:
    """The fork's copy is complete when it returns: the child's slot, given up before any
    decode, is saved to host memory and restored over at once, and every sequence still
    computes what a fresh prefill of its tokens does (measured: 0.0 off; 38.7 with the copy
    queued by `llama_memory_seq_cp`, which then lands on the restored slot at the next decode
    and was never in the saved one)."""
    runner = make_runner(n_seq_max=2, prefix_caching=True, host_bytes=1 << 30)
    fresh = make_runner(n_seq_max=1)
    if fault:
        queue_forks_with_seq_cp(runner, monkeypatch)
    other = llamacpp_engine.encode_chat(chat("Tell me about the sea, in many words."))
    prompt = llamacpp_engine.encode_chat(chat("Name three colors."))
    runner.prefill(7, other)
    runner.release(7)
    runner.prefill(0, prompt[runner.resume(0, prompt) :])  # the other slot
    assert runner.fork(0, 1)  # into the slot of `other`, which goes to host memory
    runner.release(1)  # the child is cancelled before any decode...
    # ... and a request for `other` takes its slot: the child's KV is saved, `other` restored.
    assert runner.resume(2, other) == len(other) - 1
    deviations = [runner.prefill(2, other[-1:]) - fresh.prefill(0, other)]
    runner.release(2)
    fresh.release(0)
    # The saved copy of the child serves its prompt again.
    assert runner.resume(3, prompt) == len(prompt) - 1
    deviations.append(runner.prefill(3, prompt[-1:]) - fresh.prefill(1, prompt))
    token = int(deviations[-1].argmax())
    parent, child = runner.decode([0, 3], [token, token])
    deviations.append(parent - child)
    worst = max(float(d.abs().max()) for d in deviations)
    if fault:
        assert worst > 2 * PREFILL_TOLERANCE
    else:
        assert worst <= PREFILL_TOLERANCE


@pytest.mark.parametrize("fault", [None, "stale copy"])
def test_forks_of_one_parent_share_one_copy_until_it_decodes(
    llamacpp_engine: LlamaCppEngine,
    make_runner: Callable[..., LlamaCppRunner],
    monkeypatch: pytest.MonkeyPatch,
    fault: str | None,
) -> None:
    """n - 1 children of one prompt take one on-device copy of it; once the parent decodes, the
    next fork copies it again, with the token it added."""
    runner = make_runner(n_seq_max=4)
    gets = 0
    real_get = llama.llama_state_seq_get_data_ext

    def counting_get(*args: object) -> int:
        nonlocal gets
        gets += 1
        return int(real_get(*args))  # type: ignore[arg-type]

    monkeypatch.setattr(llama, "llama_state_seq_get_data_ext", counting_get)
    prompt = llamacpp_engine.encode_chat(chat("Name three colors."))
    token = int(runner.prefill(0, prompt).argmax())
    assert runner.fork(0, 1) and runner.fork(0, 2)
    assert gets == 1
    staged = runner._staged
    assert staged is not None
    rows = runner.decode([0, 1, 2], [token] * 3)
    assert float((rows - rows[0]).abs().max()) <= DECODE_TOLERANCE
    assert runner._staged is None  # the decode changed the parent
    if fault:  # broken on purpose: the copy taken before that decode is used again
        runner._staged = (staged[0], len(prompt) + 1, staged[2])
    assert runner.fork(0, 3)
    assert pos_max(runner, lent(runner)[3]) == (len(prompt) - 1 if fault else len(prompt))
    second = int(rows[0].argmax())
    if fault:  # the child lacks the parent's last cell: llama.cpp refuses its next position
        with pytest.raises(EngineError, match="status -1"):
            runner.decode([0, 1, 2, 3], [second] * 4)
        return
    rows = runner.decode([0, 1, 2, 3], [second] * 4)
    assert gets == 2 and float((rows - rows[0]).abs().max()) <= DECODE_TOLERANCE


# --- one forward pass per step: decode tokens and prompt chunks together ---------------------


async def test_a_running_stream_advances_on_every_step_while_a_long_prompt_prefills(
    llamacpp_engine: LlamaCppEngine, make_runner: Callable[..., LlamaCppRunner]
) -> None:
    """llama.cpp's server's `update_slots`: every step's `llama_batch` carries the running
    stream's next token beside the long prompt's chunk, so the stream never waits for it."""
    runner = make_runner(n_seq_max=2)
    steps: list[tuple[list[int], list[int]]] = []  # (decoding ids, ids with a prompt chunk)
    step = runner.step

    def recorded(
        decodes: list[tuple[int, int]], chunks: list[tuple[int, list[int], bool]]
    ) -> torch.Tensor:
        steps.append(([s for s, _ in decodes], [s for s, _, _ in chunks]))
        return step(decodes, chunks)

    runner.step = recorded  # type: ignore[method-assign]
    loaded = llamacpp_engine._model()
    batcher = ContinuousBatcher(runner, loaded.tokenizer, loaded.eos_ids, token_budget=32)
    batcher.start()
    try:
        params = SamplingParams(max_tokens=80, temperature=0.0, ignore_eos=True)
        running = asyncio.ensure_future(
            text_of(batcher.stream(prompts(llamacpp_engine, 1)[0], params))
        )
        await until(lambda: len(steps) > 3)  # decoding
        long_prompt = llamacpp_engine.encode_chat(chat("lighthouse " * 250))
        await text_of(batcher.stream(long_prompt, replace(params, max_tokens=2)))
        await running
    finally:
        batcher.shutdown()
    running_id = steps[0][1][0]
    chunked = [decodes for decodes, chunks in steps if chunks and running_id not in chunks]
    assert len(chunked) >= len(long_prompt) // 31  # 31 prompt tokens beside the decode token
    assert all(running_id in decodes for decodes in chunked)
    assert batcher.stats.mixed_steps >= len(chunked)


async def text_of(deltas: AsyncIterator[Delta]) -> str:
    return "".join([d.text async for d in deltas])


def test_a_batch_of_one_token_takes_one_thread_fewer(
    make_runner: Callable[..., LlamaCppRunner],
) -> None:
    """llama.cpp computes a one-token batch with `n_threads`, larger ones with
    `n_threads_batch`: a lone stream leaves a core to the ingress, a batch takes them all."""
    runner = make_runner(n_seq_max=2, n_ctx_seq=256, n_threads=3)
    assert llama.llama_n_threads(runner._ctx) == 2
    assert llama.llama_n_threads_batch(runner._ctx) == runner.n_threads == 3
    assert llama.llama_n_threads(make_runner(n_seq_max=2, n_ctx_seq=256)._ctx) == 1  # never 0
