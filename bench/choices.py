"""The prefill that `n` choices share, in-process on the llama.cpp engine: one request for
`CHOICES` choices of a long prompt against `CHOICES` requests of that prompt sent at once. The
separate requests each prefill the prompt (prefix caching reuses a finished sequence's KV, not a
running one's); the choices prefill it once and copy its KV."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncGenerator
from contextlib import aclosing
from dataclasses import dataclass, replace

from backend.engines.llamacpp import LlamaCppEngine
from backend.generation import Delta, SamplingParams
from backend.settings import BackendSettings

CHOICES = 4


@dataclass(frozen=True)
class SharedPrefill:
    """Seconds until every choice (or request) had its first token, and the prompt tokens the
    engine computed, for one request of `CHOICES` choices and for `CHOICES` requests."""

    together_s: float
    apart_s: float
    computed_together: int
    computed_apart: int


async def _until_first_tokens(streams: list[AsyncGenerator[Delta, None]], firsts: int) -> float:
    """Seconds until `firsts` distinct (stream, choice) pairs had a delta. Every stream is read
    until then, so none ends early and leaves its KV for the others to resume from."""
    start = time.perf_counter()
    seen: set[tuple[int, int]] = set()
    all_seen = asyncio.Event()

    async def read(number: int, stream: AsyncGenerator[Delta, None]) -> None:
        async with aclosing(stream):
            async for delta in stream:
                seen.add((number, delta.index))
                if len(seen) == firsts:
                    all_seen.set()
                if all_seen.is_set():
                    return

    readers = [asyncio.create_task(read(i, s)) for i, s in enumerate(streams)]
    await all_seen.wait()
    elapsed = time.perf_counter() - start
    await asyncio.gather(*readers)
    return elapsed


def shared_prefill(prompt_words: int, threads: int, repeats: int = 2) -> SharedPrefill:
    """Both ways `repeats` times, interleaved, each on a prompt never seen before (nothing
    cached); the fastest run of each."""
    engine = LlamaCppEngine(BackendSettings(max_batch_size=CHOICES, cpu_threads=threads))
    engine.start()
    stats = engine.batcher.stats
    # Longer than the run lasts: no stream ends (and parks its KV) before the last first token.
    params = SamplingParams(max_tokens=256, temperature=1.0, seed=1, ignore_eos=True)
    prompts = iter(range(1_000_000))

    def prompt() -> list[int]:
        words = " ".join(f"note {next(prompts)} on the tide" for _ in range(prompt_words // 5))
        return engine.encode_chat([{"role": "user", "content": f"Summarise: {words}"}])

    def computed() -> int:
        return stats.prompt_tokens - stats.cached_tokens

    try:
        together, apart, computed_together, computed_apart = [], [], 0, 0
        for _ in range(repeats):
            before = computed()
            one = [engine.generate(prompt(), replace(params, n=CHOICES))]
            together.append(asyncio.run(_until_first_tokens(one, CHOICES)))
            computed_together = computed() - before
            before = computed()
            same = prompt()
            many = [engine.generate(same, params) for _ in range(CHOICES)]
            apart.append(asyncio.run(_until_first_tokens(many, CHOICES)))
            computed_apart = computed() - before
        return SharedPrefill(min(together), min(apart), computed_together, computed_apart)
    finally:
        engine.shutdown()
