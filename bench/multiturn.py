"""Multi-turn chat over HTTP: users whose conversations grow turn by turn, as the UI sends them.

Every turn sends the whole conversation so far (as every OpenAI client does) plus ~200 tokens of
new notes and a question; the reply is a fixed number of tokens. With prefix caching the backend
computes only what is new, so time to first token stays flat as the conversation grows.
"""

from __future__ import annotations

import asyncio
import itertools
import random
import statistics
import time
from dataclasses import dataclass

import httpx

from bench.load import Reply, stream

_WORDS = [
    "lighthouse",
    "keeper",
    "harbour",
    "storm",
    "lantern",
    "ship",
    "rope",
    "tide",
    "gull",
    "beacon",
    "cliff",
    "fog",
    "night",
    "wave",
    "island",
    "captain",
    "boat",
    "oil",
    "glass",
    "stairs",
    "bell",
    "coast",
    "rock",
    "sailor",
    "wind",
    "salt",
    "map",
    "journal",
]


@dataclass
class MultiTurn:
    """Every turn's replies, `turns[turn][user]`."""

    turns: list[list[Reply]]

    def ttft(self, turn: int) -> float:
        """Median time to first token of a turn (1-based) over the users."""
        return statistics.median(r.ttft for r in self.turns[turn - 1])

    def prompt_tokens(self, turn: int) -> int:
        """The longest prompt of a turn (1-based)."""
        return max(r.prompt_tokens for r in self.turns[turn - 1])

    def hit_rate(self) -> float:
        """vLLM's prefix-cache hit rate: prompt tokens reused over prompt tokens, all turns."""
        replies = [r for turn in self.turns for r in turn]
        return sum(r.cached_tokens for r in replies) / sum(r.prompt_tokens for r in replies)

    def reuse(self) -> float:
        """Prompt tokens reused over what the user's previous turn left computed (its prompt
        and every reply token but the last), from turn 2 on: how much of a conversation the
        cache kept, whatever share of each prompt is new."""
        reused = computed = 0
        for before, turn in itertools.pairwise(self.turns):
            for previous, reply in zip(before, turn, strict=True):
                reused += reply.cached_tokens
                computed += previous.prompt_tokens + previous.tokens - 1
        return reused / computed


def notes(rng: random.Random, words: int) -> str:
    """A paragraph of ~`words` words (~1.3 tokens each with SmolLM2's tokenizer)."""
    return " ".join(rng.choice(_WORDS) for _ in range(words)) + "."


async def chat(
    url: str, users: int, turns: int, reply_tokens: int = 48, note_words: int = 150
) -> MultiTurn:
    """`users` conversations of `turns` turns; a user sends its next turn as soon as its reply
    is in, so turns of different users interleave."""
    texts = random.Random(0)
    replies: dict[tuple[int, int], Reply] = {}

    async def user(index: int, http: httpx.AsyncClient) -> None:
        history: list[dict[str, str]] = []
        for turn in range(turns):
            question = f"{notes(texts, note_words)} Question {turn + 1}: what did the keeper see?"
            history.append({"role": "user", "content": question})
            reply = await stream(http, url, reply_tokens, 100 * index + turn, messages=history)
            history.append({"role": "assistant", "content": reply.text})
            replies[turn, index] = reply

    async with httpx.AsyncClient(timeout=600) as http:
        await warm_up(http, url)
        await asyncio.gather(*(user(i, http) for i in range(users)))
    return MultiTurn([[replies[t, u] for u in range(users)] for t in range(turns)])


async def round_robin(
    url: str, users: int, turns: int, reply_tokens: int = 32, note_words: int = 60
) -> MultiTurn:
    """More conversations than the engine has live sequences, one request at a time in turn:
    each conversation's next turn comes after every other conversation's, so its KV must have
    been pushed out of the engine's sequences (to host memory, with prefix caching)."""
    histories: list[list[dict[str, str]]] = [[] for _ in range(users)]
    texts = random.Random(1)
    results: list[list[Reply]] = []
    async with httpx.AsyncClient(timeout=600) as http:
        await warm_up(http, url)
        for turn in range(turns):
            results.append([])
            for index in range(users):
                question = f"{notes(texts, note_words)} Question {turn + 1}?"
                histories[index].append({"role": "user", "content": question})
                reply = await stream(http, url, reply_tokens, turn, messages=histories[index])
                histories[index].append({"role": "assistant", "content": reply.text})
                results[turn].append(reply)
    return MultiTurn(results)


async def warm_up(http: httpx.AsyncClient, url: str) -> None:
    """One request first: a fresh backend's first is slower (lazy initialisation on its path),
    which would flatter every later turn's ratio to turn 1."""
    await stream(http, url, 8, 0, messages=[{"role": "user", "content": "Hello."}])


def llamacpp_prefill_floor(new_tokens: int, history_tokens: int, threads: int) -> float:
    """In-process llama.cpp, no server: time to prefill `new_tokens` after `history_tokens`
    already in the KV over the time to prefill them from position 0 (attention over the
    history is what a perfect cache still pays). Median of three."""
    from backend.engines.embedded import embedded_gguf_path
    from backend.engines.llamacpp_runner import LlamaCppRunner, LlamaModel

    model = LlamaModel(embedded_gguf_path())
    runner = LlamaCppRunner(model, 1, history_tokens + new_tokens, threads)
    tokens = [100 + i % 5000 for i in range(history_tokens + new_tokens)]
    ratios = []
    try:
        for _ in range(3):
            runner.prefill(0, tokens[:history_tokens])
            start = time.perf_counter()
            runner.prefill(0, tokens[history_tokens:])
            after = time.perf_counter() - start
            runner.release(0)
            start = time.perf_counter()
            runner.prefill(1, tokens[history_tokens:])
            alone = time.perf_counter() - start
            runner.release(1)
            ratios.append(after / alone)
    finally:
        runner.close()
        model.close()
    return statistics.median(ratios)
