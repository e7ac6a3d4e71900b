"""Multi-turn chat over HTTP: users whose conversations grow turn by turn, as the UI sends them.

Every turn sends the whole conversation so far (as every OpenAI client does) plus ~200 tokens of
new notes and a question; the reply is a fixed number of tokens. With prefix caching the backend
computes only what is new, so time to first token stays flat as the conversation grows.
"""

from __future__ import annotations

import asyncio
import random
import statistics
from dataclasses import dataclass

import httpx

from tests.bench.load import Reply, stream

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
    """Each turn's replies (one per user), in turn order."""

    turns: list[list[Reply]]

    def ttft(self, turn: int) -> float:
        """Median time to first token of a turn (1-based) over the users."""
        return statistics.median(r.ttft for r in self.turns[turn - 1])

    def prompt_tokens(self, turn: int) -> int:
        """The longest prompt of a turn."""
        return max(r.prompt_tokens for r in self.turns[turn - 1])

    def hit_rate(self, first_turn: int = 1) -> float:
        """Prompt tokens reused from the cache over all prompt tokens, from `first_turn` on."""
        replies = [r for turn in self.turns[first_turn - 1 :] for r in turn]
        return sum(r.cached_tokens for r in replies) / sum(r.prompt_tokens for r in replies)


def notes(rng: random.Random, words: int) -> str:
    """A paragraph of ~`words` words (~1.3 tokens each with SmolLM2's tokenizer)."""
    return " ".join(rng.choice(_WORDS) for _ in range(words)) + "."


async def chat(
    url: str, users: int, turns: int, reply_tokens: int = 48, note_words: int = 150
) -> MultiTurn:
    """`users` conversations of `turns` turns; a user sends its next turn as soon as its reply
    is in, so turns of different users interleave."""
    histories: list[list[dict[str, str]]] = [[] for _ in range(users)]
    texts = random.Random(0)
    results: list[list[Reply]] = [[] for _ in range(turns)]

    async def user(index: int, http: httpx.AsyncClient) -> None:
        for turn in range(turns):
            question = f"{notes(texts, note_words)} Question {turn + 1}: what did the keeper see?"
            histories[index].append({"role": "user", "content": question})
            reply = await stream(
                http, url, reply_tokens, 100 * index + turn, messages=histories[index]
            )
            histories[index].append({"role": "assistant", "content": reply.text})
            results[turn].append(reply)

    async with httpx.AsyncClient(timeout=600) as http:
        await asyncio.gather(*(user(i, http) for i in range(users)))
    return MultiTurn(results)


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
        for turn in range(turns):
            results.append([])
            for index in range(users):
                question = f"{notes(texts, note_words)} Question {turn + 1}?"
                histories[index].append({"role": "user", "content": question})
                reply = await stream(http, url, reply_tokens, turn, messages=histories[index])
                histories[index].append({"role": "assistant", "content": reply.text})
                results[turn].append(reply)
    return MultiTurn(results)
