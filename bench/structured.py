"""The cost of structured output, in-process on the llama.cpp engine: a batch of eight streams
with one constrained by a JSON schema, against the same batch with all eight free. Every stream
runs exactly `tokens` tokens (the constrained one's schema is a long array, cut by max_tokens),
so both batches do the same decode steps and only the mask differs."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

from backend.engines.llamacpp import LlamaCppEngine
from backend.generation import SamplingParams
from backend.settings import BackendSettings
from backend.structured import json_grammar

BATCH = 8


@dataclass(frozen=True)
class MaskCost:
    """Tokens per second of the free streams with and without a constrained one beside them,
    and the constrained stream's own rate."""

    free_alone: float
    free_beside_constrained: float
    constrained: float


async def _timed(engine: LlamaCppEngine, prompt: list[int], params: SamplingParams) -> float:
    """Seconds until the stream's last token."""
    start = time.perf_counter()
    async for _ in engine.generate(prompt, params):
        pass
    return time.perf_counter() - start


async def _batch(
    engine: LlamaCppEngine, prompt: list[int], free: SamplingParams, eighth: SamplingParams
) -> tuple[float, float]:
    """Wall time of `BATCH - 1` free streams beside `eighth`, and `eighth`'s own time."""
    start = time.perf_counter()
    times = await asyncio.gather(
        *[_timed(engine, prompt, free) for _ in range(BATCH - 1)],
        _timed(engine, prompt, eighth),
    )
    return time.perf_counter() - start, times[-1]


def mask_cost(tokens: int, threads: int, repeats: int = 3) -> MaskCost:
    """Measure both batches `repeats` times, interleaved, and keep each one's fastest run."""
    engine = LlamaCppEngine(BackendSettings(max_batch_size=BATCH, cpu_threads=threads))
    engine.start()
    try:
        prompt = engine.encode_chat([{"role": "user", "content": "List some digits as JSON."}])
        free = SamplingParams(max_tokens=tokens, temperature=1.0, ignore_eos=True, seed=1)
        schema = {
            "type": "array",
            "items": {"type": "integer", "minimum": 0, "maximum": 9},
            "minItems": tokens,
            "maxItems": tokens,
        }
        constrained = SamplingParams(
            max_tokens=tokens, temperature=1.0, seed=1, grammar=json_grammar(schema)
        )
        asyncio.run(_batch(engine, prompt, free, free))  # warm-up
        alone, beside, own = [], [], []
        for _ in range(repeats):
            alone.append(asyncio.run(_batch(engine, prompt, free, free))[0])
            wall, constrained_s = asyncio.run(_batch(engine, prompt, free, constrained))
            beside.append(wall)
            own.append(constrained_s)
        free_tokens = (BATCH - 1) * tokens
        return MaskCost(free_tokens / min(alone), free_tokens / min(beside), tokens / min(own))
    finally:
        engine.shutdown()
