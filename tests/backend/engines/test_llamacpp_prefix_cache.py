"""Prefix caching in `LlamaCppRunner`, on the real embedded GGUF: reuse, trimming, host copies."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Callable

import torch

from backend.engines.llamacpp import LlamaCppEngine, kv_cache_bytes
from backend.engines.llamacpp_runner import LlamaCppRunner, LlamaModel
from backend.generation import SamplingParams
from tests.backend.engines.llama_view import held_tokens, lent, pos_max, until
from tests.backend.engines.test_llamacpp import PREFILL_TOLERANCE, collect


def turn(
    runner: LlamaCppRunner, seq_id: int, prompt: list[int], steps: int
) -> tuple[int, list[int], torch.Tensor]:
    """One request as the loop runs it: resume, prefill the rest, decode greedily, release.
    Returns the tokens resumed, the reply and the logits before each reply token."""
    cached = runner.resume(seq_id, prompt) if runner.prefix_caching else 0
    logits = [runner.prefill(seq_id, prompt[cached:])]
    reply: list[int] = []
    for _ in range(steps):
        reply.append(int(logits[-1].argmax()))
        logits.append(runner.decode([seq_id], [reply[-1]])[0])
    runner.release(seq_id)
    return cached, reply, torch.stack(logits)


def state_bytes(engine: LlamaCppEngine) -> int:
    """One token's KV in a saved sequence state (the state adds a few bytes of header)."""
    assert engine._llama is not None
    return kv_cache_bytes(engine._llama, 1)


def deviation(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max())


def conversation(*turns: str) -> list[dict[str, str]]:
    """User and assistant messages alternating, starting with the user."""
    roles = ["user", "assistant"]
    return [{"role": roles[i % 2], "content": text} for i, text in enumerate(turns)]


def detok(engine: LlamaCppEngine, tokens: list[int]) -> str:
    return engine._model().tokenizer.decode(tokens, skip_special_tokens=True)


def test_a_follow_up_turn_resumes_its_conversation_and_matches_a_full_prefill(
    llamacpp_engine: LlamaCppEngine, make_runner: Callable[..., LlamaCppRunner]
) -> None:
    cached_runner, fresh = make_runner(n_seq_max=2, prefix_caching=True), make_runner(n_seq_max=2)
    first = llamacpp_engine.encode_chat(conversation("Tell me about the sea."))
    _, reply, _ = turn(cached_runner, 0, first, 12)
    follow = llamacpp_engine.encode_chat(
        conversation(
            "Tell me about the sea.",
            detok(llamacpp_engine, reply),
            "And the ships?",
        )
    )
    cached, _, resumed = turn(cached_runner, 1, follow, 8)
    # Everything up to the reply's re-tokenized end is reused (the template adds its own end).
    assert len(first) < cached < len(follow)
    _, _, whole = turn(fresh, 0, follow, 8)
    assert deviation(resumed, whole) <= PREFILL_TOLERANCE


def test_an_edited_conversation_never_sees_the_old_suffix(
    llamacpp_engine: LlamaCppEngine, make_runner: Callable[..., LlamaCppRunner]
) -> None:
    """The UI's edit: turn 2 is rewritten, so only turn 1 is shared with what the slot holds."""
    runner, fresh = make_runner(n_seq_max=1, prefix_caching=True), make_runner(n_seq_max=2)
    texts = ["Name a color.", "Blue.", "Why is the sky blue? Answer in one long sentence."]
    original = llamacpp_engine.encode_chat(conversation(*texts))
    turn(runner, 0, original, 4)
    edited = llamacpp_engine.encode_chat(conversation(*texts[:2], "What is 2 + 2?"))
    cached, _, resumed = turn(runner, 1, edited, 8)
    shared = next(i for i, (a, b) in enumerate(zip(original, edited, strict=False)) if a != b)
    assert cached == shared
    assert pos_max(runner, 0) == len(edited) + 8 - 1  # the old suffix's cells are gone
    _, _, whole = turn(fresh, 0, edited, 8)
    assert deviation(resumed, whole) <= PREFILL_TOLERANCE


def test_with_caching_off_nothing_is_kept(
    llamacpp_engine: LlamaCppEngine, make_runner: Callable[..., LlamaCppRunner]
) -> None:
    runner = make_runner(n_seq_max=2)
    prompt = llamacpp_engine.encode_chat(conversation("Hi"))
    turn(runner, 0, prompt, 3)
    assert held_tokens(runner) == [[], []] and pos_max(runner, 0) == pos_max(runner, 1) == -1


def test_a_conversation_pushed_out_of_its_slot_comes_back_from_host_memory(
    llamacpp_engine: LlamaCppEngine, make_runner: Callable[..., LlamaCppRunner]
) -> None:
    runner, fresh = (
        make_runner(n_seq_max=1, prefix_caching=True, host_bytes=64 * 2**20),
        make_runner(n_seq_max=2),
    )
    a = llamacpp_engine.encode_chat(conversation("Tell me a story about a cat."))
    b = llamacpp_engine.encode_chat(conversation("Count to ten, please."))
    _, a_reply, _ = turn(runner, 0, a, 10)
    turn(runner, 1, b, 10)  # the only slot goes to B: A is copied to host memory first
    assert len(runner.parked) == 1
    follow = llamacpp_engine.encode_chat(
        conversation(
            "Tell me a story about a cat.",
            detok(llamacpp_engine, a_reply),
            "What was its name?",
        )
    )
    cached, _, restored = turn(runner, 2, follow, 8)
    assert cached > len(a)
    _, _, whole = turn(fresh, 0, follow, 8)
    assert deviation(restored, whole) <= PREFILL_TOLERANCE
    # Host memory keeps B and A's first turn (the slot keeps what it loaded, and more);
    # A's copy goes when the slot's longer conversation is copied out in its place.
    assert len(runner.parked) == 2 and runner.parked.nbytes <= runner.parked.budget_bytes
    turn(runner, 3, b, 2)  # B again: the slot's A goes to host memory, A's first turn with it
    assert len(runner.parked) == 2 and runner.parked.best(follow)[0] == len(follow)


def test_the_host_budget_keeps_the_most_recent_conversations(
    llamacpp_engine: LlamaCppEngine, make_runner: Callable[..., LlamaCppRunner]
) -> None:
    questions = ["Name a color.", "Name a fruit.", "Name a city."]
    chats = [llamacpp_engine.encode_chat(conversation(q)) for q in questions]
    # Room for one saved conversation of ~40 tokens, not two.
    token = state_bytes(llamacpp_engine)
    runner = make_runner(n_seq_max=1, prefix_caching=True, host_bytes=70 * token)
    for i, prompt in enumerate(chats):
        turn(runner, i, prompt, 4)
    assert len(runner.parked) == 1  # A was dropped for B, the least recently used first
    assert runner.resume(10, chats[1]) == len(chats[1]) - 1  # B: back from host memory
    runner.release(10)
    shared_template = runner.resume(11, chats[0])
    assert shared_template < len(chats[0]) - 2  # A: only what every chat shares (the template)
    tiny = make_runner(n_seq_max=1, prefix_caching=True, host_bytes=token)  # holds none
    for i, prompt in enumerate(chats[:2]):
        turn(tiny, i, prompt, 4)
    assert len(tiny.parked) == 0


def test_after_many_mixed_requests_only_parked_prefixes_remain(
    tiny_llama: LlamaModel, make_runner: Callable[..., LlamaCppRunner]
) -> None:
    """1000 requests (shared starts, edits, cancels mid-prefill, interleaved): no slot leaks,
    llama.cpp's memory holds exactly the tokens the runner believes, the host stays in budget.
    On a tiny model: this is bookkeeping against llama.cpp's memory, whatever the weights say."""
    runner = make_runner(
        n_seq_max=3,
        prefix_caching=True,
        host_bytes=200 * kv_cache_bytes(tiny_llama, 1),
        model=tiny_llama,
    )
    rng = random.Random(0)
    stems = [[rng.randrange(100, 5000) for _ in range(rng.randrange(4, 12))] for _ in range(6)]
    live: dict[int, int] = {}  # seq id -> decode steps left
    for seq_id in range(1000):
        if len(live) == 3:
            done = rng.choice(list(live))
            runner.release(done)
            del live[done]
        prompt = rng.choice(stems) + [rng.randrange(100, 5000) for _ in range(rng.randrange(1, 6))]
        cached = runner.resume(seq_id, prompt)
        assert 0 <= cached < len(prompt)
        runner.prefill(seq_id, prompt[cached:])
        live[seq_id] = rng.randrange(0, 4)
        assert runner.kv_usage() > 0
        ready = [s for s, left in live.items() if left > 0]
        if ready:
            runner.decode(ready, [rng.randrange(100, 5000) for _ in ready])
            for s in ready:
                live[s] -= 1
    for seq_id in list(live):
        runner.release(seq_id)
    assert lent(runner) == {} and runner.kv_usage() == 0.0  # parked KV counts as free
    for index, tokens in enumerate(held_tokens(runner)):
        assert pos_max(runner, index) == len(tokens) - 1
    assert runner.parked.nbytes <= runner.parked.budget_bytes


async def test_more_streams_than_sequences_beside_parked_conversations(
    llamacpp_engine: LlamaCppEngine,
) -> None:
    """Through the loop: four conversations parked, then their follow-ups and four new ones at
    once on four sequences. Every stream gets its tokens, follow-ups resume, nothing leaks."""
    runner = llamacpp_engine._runner
    assert runner is not None
    params = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
    questions = [f"Question {i}: name a color, a fruit and a city." for i in range(8)]
    firsts = [llamacpp_engine.encode_chat(conversation(q)) for q in questions]
    replies = [await collect(llamacpp_engine.generate(p, params)) for p in firsts[:4]]
    follow_ups = [
        llamacpp_engine.encode_chat(conversation(q, "".join(d.text for d in r), "And another?"))
        for q, r in zip(questions, replies, strict=False)
    ]
    results = await asyncio.gather(
        *(collect(llamacpp_engine.generate(p, params)) for p in [*follow_ups, *firsts[4:]])
    )
    assert [sum(d.tokens for d in r) for r in results] == [6] * 8
    resumed = [r[0].cached_tokens for r in results[:4]]
    assert all(n > len(f) for n, f in zip(resumed, firsts, strict=False)), resumed
    await until(lambda: llamacpp_engine.batcher.occupancy() == (0, 0))  # all released
    assert lent(runner) == {} and runner.kv_usage() == 0.0
    for index, tokens in enumerate(held_tokens(runner)):
        assert pos_max(runner, index) == len(tokens) - 1


def test_a_forked_child_holds_its_copy_at_once(
    llamacpp_engine: LlamaCppEngine, make_runner: Callable[..., LlamaCppRunner]
) -> None:
    """The child's KV is copied when it is forked, not at a later decode: a child that ends
    on its first token, whose slot a waiting prompt then restores a saved conversation into,
    leaves that conversation intact (and the child's copy, saved, is the parent's prompt)."""
    runner = make_runner(n_seq_max=2, prefix_caching=True, host_bytes=64 * 2**20)
    fresh = make_runner(n_seq_max=1)
    saved = llamacpp_engine.encode_chat(conversation("Tell me about the sea, in many words."))
    runner.prefill(7, saved)
    runner.release(7)
    prompt = llamacpp_engine.encode_chat(conversation("Name three colors."))
    cached = runner.resume(0, prompt)  # pushes the sea conversation out of its slot: saved
    runner.prefill(0, prompt[cached:])
    assert runner.fork(0, 1)
    runner.release(1)  # the child ended on its first token; the parent goes on
    follow = [*saved, *llamacpp_engine.encode_text(" And the tides?")]
    cached = runner.resume(2, follow)
    assert cached == len(saved)  # restored from host memory into the child's slot
    expected = fresh.prefill(0, follow)
    assert deviation(runner.prefill(2, follow[cached:]), expected) <= PREFILL_TOLERANCE
