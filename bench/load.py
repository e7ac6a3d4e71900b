"""HTTP load on a running backend: single streams, concurrent conversations, saturation."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import itertools
import json
import multiprocessing
import os
import random
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import httpx

PROMPT = [{"role": "user", "content": "Write a long, detailed story about a lighthouse keeper."}]


@dataclass
class Run:
    """Completion tokens produced, the wall time it took, and each request's time to first token."""

    tokens: int
    seconds: float
    ttfts: list[float] = field(default_factory=list)

    @property
    def rate(self) -> float:
        """Completion tokens per second."""
        return self.tokens / self.seconds

    @property
    def ttft_p50(self) -> float:
        """Median time to first token, seconds."""
        return statistics.median(self.ttfts)


@dataclass
class Reply:
    """One streamed request: tokens, time to first content, and the times of every content chunk."""

    tokens: int
    ttft: float
    chunk_times: list[float]
    text: str = ""
    prompt_tokens: int = 0
    cached_tokens: int = 0  # of the prompt, reused from the backend's KV cache


async def stream(
    http: httpx.AsyncClient,
    url: str,
    max_tokens: int,
    seed: int,
    messages: object = PROMPT,
    extra: dict[str, object] | None = None,
    chunk_times: list[float] | None = None,
) -> Reply:
    """One streamed chat completion of exactly `max_tokens` tokens (`ignore_eos`; servers
    without it get `extra`, e.g. a logit bias against the end tokens). Each content chunk's
    time is appended to `chunk_times` as it comes, if given (read while the stream runs)."""
    body = {
        **(extra or {}),
        "messages": messages,
        "max_tokens": max_tokens,
        "temperature": 0.7,
        "seed": seed,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    start = time.perf_counter()
    chunk_times = [] if chunk_times is None else chunk_times
    pieces: list[str] = []
    usage: dict[str, Any] = {}
    for resend in (True, False):
        try:
            async with http.stream("POST", url + "/v1/chat/completions", json=body) as response:
                response.raise_for_status()
                async for line in response.aiter_lines():
                    if not line.startswith("data: {"):
                        continue
                    chunk = json.loads(line[6:])
                    usage = chunk.get("usage") or usage
                    delta = chunk["choices"][0]["delta"] if chunk["choices"] else {}
                    if content := delta.get("content"):
                        chunk_times.append(time.perf_counter())
                        pieces.append(content)
            break
        except httpx.RemoteProtocolError as error:
            # llama-server (cpp-httplib) closes kept-alive connections, once in a while as the
            # next request goes out on one: with no response at all, it is sent once more.
            if not (resend and "without sending a response" in str(error)):
                raise
    details = usage.get("prompt_tokens_details") or {}
    return Reply(
        # llama-cpp-python's server sends no usage chunk, but one chunk per token.
        usage.get("completion_tokens") or len(chunk_times),
        chunk_times[0] - start,
        chunk_times,
        "".join(pieces),
        usage.get("prompt_tokens", 0),
        details.get("cached_tokens", 0),
    )


async def single_streams(
    url: str, max_tokens: int, repeats: int, extra: dict[str, object] | None = None
) -> Run:
    """`repeats` requests one after another, after one warm-up."""
    async with httpx.AsyncClient(timeout=600) as http:
        await stream(http, url, max_tokens, 0, extra=extra)
        start = time.perf_counter()
        replies = [await stream(http, url, max_tokens, s, extra=extra) for s in range(repeats)]
    return Run(
        sum(r.tokens for r in replies), time.perf_counter() - start, [r.ttft for r in replies]
    )


async def burst(
    url: str, max_tokens: int, concurrency: int, extra: dict[str, object] | None = None
) -> Run:
    """`concurrency` requests sent at the same instant."""
    async with httpx.AsyncClient(timeout=600) as http:
        start = time.perf_counter()
        replies = await asyncio.gather(
            *(stream(http, url, max_tokens, s, extra=extra) for s in range(concurrency))
        )
    return Run(
        sum(r.tokens for r in replies), time.perf_counter() - start, [r.ttft for r in replies]
    )


async def conversations(url: str, max_tokens: int, users: int, turns: int, alone_s: float) -> Run:
    """`users` users chatting at once: each asks `turns` questions back to back, replies of
    varied length; they start spread over the time one reply takes alone, as real users do
    (not all in the same millisecond)."""
    lengths = random.Random(0)

    async def user(index: int, http: httpx.AsyncClient) -> list[Reply]:
        await asyncio.sleep(index * alone_s / users)
        replies = []
        for turn in range(turns):
            n = lengths.randint(max_tokens // 2, max_tokens * 3 // 2)
            replies.append(await stream(http, url, n, 1000 * index + turn))
        return replies

    async with httpx.AsyncClient(timeout=600) as http:
        start = time.perf_counter()
        per_user = await asyncio.gather(*(user(i, http) for i in range(users)))
        seconds = time.perf_counter() - start
    replies = [r for rs in per_user for r in rs]
    return Run(sum(r.tokens for r in replies), seconds, [r.ttft for r in replies])


@dataclass(frozen=True)
class Gaps:
    """Inter-token gaps of running streams, seconds: pooled over the streams."""

    median: float
    p99: float
    max: float


def gap_stats(streams: Sequence[Sequence[float]], start: float, end: float) -> Gaps:
    """The gaps between consecutive chunk times of each stream that overlap [`start`, `end`]
    (a gap that began before `start` and ended inside counts: it is the stall)."""
    gaps = [
        b - a for times in streams for a, b in itertools.pairwise(times) if b > start and a < end
    ]
    if not gaps:
        raise ValueError("no stream produced two tokens within the window")
    return Gaps(statistics.median(gaps), _p99(gaps), max(gaps))


@dataclass(frozen=True)
class Mixed:
    """Running streams' gaps before and while long prompts arrive, and those prompts' times to
    first token."""

    steady: Gaps  # the streams decoding alone
    during: Gaps  # from the first arrival sent to the last one's reply
    whole: Gaps  # both: the running streams' whole run
    arrival_ttfts: list[float]
    arrival_tokens: int  # the longest arriving prompt, tokens

    @property
    def spread(self) -> float:
        """The running streams' longest gap over their median one, over their whole run (alone,
        then while the prompts arrive): the measure the target is set on. It rewards steps of
        even cost, however long."""
        return self.whole.max / self.whole.median

    @property
    def stall(self) -> float:
        """The longest gap while prompts arrive over the median one decoding alone: how much
        slower a stream's worst step is than its steps without prompts (stricter than `spread`:
        a step that carries a prompt chunk costs more than a decode step, however even)."""
        return self.during.max / self.steady.median


async def mixed_load(
    url: str,
    prompt_words: int,
    running: int,
    arrivals: int,
    steady_s: float = 3.0,
    extra: dict[str, object] | None = None,
) -> Mixed:
    """`running` streams decoding alone for `steady_s`, then `arrivals` prompts of
    ~`prompt_words` words sent at once (each its own: no prefix shared) until the last one's
    reply; the streams are then cancelled."""
    async with httpx.AsyncClient(timeout=600) as http:
        await stream(http, url, 8, 0, extra=extra)  # warm-up
        times: list[list[float]] = [[] for _ in range(running)]
        streams = [
            asyncio.ensure_future(stream(http, url, 2048, 7 + i, extra=extra, chunk_times=times[i]))
            for i in range(running)
        ]
        while not all(len(t) > 8 for t in times):  # all decoding
            if ended := [task for task in streams if task.done()]:  # result() raises its error
                raise RuntimeError(f"a running stream ended early: {ended[0].result()}")
            await asyncio.sleep(0.05)
        decoding = time.perf_counter()
        await asyncio.sleep(steady_s)
        start = time.perf_counter()
        replies = await asyncio.gather(
            *(
                stream(http, url, 4, s, _long_prompt(s, prompt_words), extra)
                for s in range(arrivals)
            )
        )
        end = time.perf_counter()
        for task in streams:
            task.cancel()
        await asyncio.gather(*streams, return_exceptions=True)
    prompt_tokens = max(r.prompt_tokens for r in replies)
    steady, during = gap_stats(times, decoding, start), gap_stats(times, start, end)
    whole = gap_stats(times, decoding, end)
    return Mixed(steady, during, whole, [r.ttft for r in replies], prompt_tokens)


def _long_prompt(index: int, words: int) -> list[dict[str, str]]:
    return [{"role": "user", "content": f"Note {index}: " + " ".join(["lighthouse"] * words)}]


@dataclass
class Saturation:
    """Latency of the control routes while the backend holds far more streams than its batch."""

    health_p99: float
    models_p99: float
    health_failures: int
    refused: int  # streams answered 503 (more than the replicas and the ingress hold)
    admission_max: float  # the slowest probe of either route while the streams were admitted
    prober_first: bool  # the prober had the CPU whenever it woke (SCHED_FIFO), as a kubelet has


async def saturation(
    url: str, streams: int, seconds: float, admission_s: float = 2.0, prober_first: bool = False
) -> Saturation:
    """Open `streams` streams at once and probe `/healthz` and `/v1/models` from that moment on:
    the slowest probe of the first `admission_s` (the streams being admitted), then the p99 of
    the next `seconds` (all of them held: running, queued or refused).

    The probes run in a process of their own, as a kubelet's do: in this one they would wait
    behind this event loop reading hundreds of streams, and measure the client, not the server.
    `prober_first` runs that process first in line for the CPU (SCHED_FIFO, where permitted): a
    kubelet has CPU reserved on its node, while a prober sharing the model's cores waits for a CPU
    each time it wakes (Linux schedules each session as a group), and measures the machine's
    scheduler more than the server. The bench reports both.
    """
    limits = httpx.Limits(max_connections=streams + 16, max_keepalive_connections=streams + 16)
    refused: list[int] = []

    async def hold(http: httpx.AsyncClient, seed: int) -> None:
        body = {"messages": PROMPT, "max_tokens": 256, "seed": seed, "stream": True}
        async with http.stream("POST", url + "/v1/chat/completions", json=body) as response:
            if response.status_code == 503:
                refused.append(seed)
            async for _ in response.aiter_lines():
                pass

    loop = asyncio.get_running_loop()
    spawn = multiprocessing.get_context("spawn")  # no copy of this process's event loop
    first = _run_first if prober_first else None
    with concurrent.futures.ProcessPoolExecutor(1, mp_context=spawn, initializer=first) as prober:
        got_first = await loop.run_in_executor(prober, _runs_first)  # started before the streams
        async with httpx.AsyncClient(timeout=600, limits=limits) as http:
            probes = loop.run_in_executor(prober, probe_control_routes, url, admission_s + seconds)
            holders = [asyncio.ensure_future(hold(http, s)) for s in range(streams)]
            health, models, failures = await probes
            for holder in holders:  # the clients leave: their batch slots and queues free up
                holder.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.gather(*holders, return_exceptions=True)
    admitting = [t for start, t in health + models if start < admission_s]
    held = {
        route: [t for start, t in samples if start >= admission_s]
        for route, samples in (("health", health), ("models", models))
    }
    return Saturation(
        _p99(held["health"]),
        _p99(held["models"]),
        failures,
        len(refused),
        max(admitting),
        got_first,
    )


def _run_first() -> None:
    """Put this process first in line for the CPU, if the OS lets us (root, or CAP_SYS_NICE).
    It sleeps between probes, so it takes little CPU from anyone."""
    with contextlib.suppress(OSError, AttributeError):  # refused, or not Linux
        os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(1))


def _runs_first() -> bool:
    try:
        return os.sched_getscheduler(0) == os.SCHED_FIFO
    except (OSError, AttributeError):
        return False


Probe = tuple[float, float]  # (seconds since probing began, seconds the request took)


def probe_control_routes(url: str, seconds: float) -> tuple[list[Probe], list[Probe], int]:
    """Each `/healthz` and `/v1/models` request over `seconds`, and the failures."""

    async def probe(http: httpx.AsyncClient, path: str, times: list[Probe]) -> int:
        failures = 0
        began = time.perf_counter()
        while time.perf_counter() - began < seconds:
            start = time.perf_counter()
            try:
                ok = (await http.get(url + path, timeout=10)).status_code == 200
            except httpx.HTTPError:
                ok = False
            times.append((start - began, time.perf_counter() - start))
            failures += not ok
            await asyncio.sleep(0.05)
        return failures

    async def both() -> tuple[list[Probe], list[Probe], int]:
        health: list[Probe] = []
        models: list[Probe] = []
        async with httpx.AsyncClient(timeout=10) as http:
            failed = await asyncio.gather(
                probe(http, "/healthz", health), probe(http, "/v1/models", models)
            )
        return health, models, sum(failed)

    return asyncio.run(both())


def _p99(values: list[float]) -> float:
    return statistics.quantiles(values, n=100)[98] if len(values) > 1 else values[0]
