"""guidellm (vLLM's benchmark tool, from PyPI) against our backend, beside our own client.

An outside check of the bench's figures: one llamacpp backend, the same requests sent by our
client (`bench.load.stream`) and by guidellm. The loads have the shapes of the engine section's
figures: the bench's prompt, `MAX_TOKENS` tokens out (`ignore_eos`, which guidellm sends itself),
one stream at a time and `BURST` at once; then guidellm's multi-turn mode (synthetic
conversations, each turn sending the whole history) beside `bench.multiturn.chat` with as many
users, turns and tokens. Each load is run by our client then by guidellm, seconds apart, and
all of that `ROUNDS` times; each figure's best run counts: other work on this shared machine only
ever slows a run down.

Figures as guidellm defines them: output tokens per second over the load's wall time, median
time to first token, median inter-token latency ((last token - first token) / (tokens - 1)).

guidellm pins click and multidict below the versions Ray and aiohttp run with here, so it lives in
`.venv-guidellm` (made by `make bench`) and runs as a subprocess, with its JSON report parsed.
"""

from __future__ import annotations

import asyncio
import json
import os
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from backend.engines.embedded import embedded_gguf_path
from backend.engines.gguf_tokenizer import tokenizer_cache_dir
from backend.settings import BackendSettings
from bench import load, multiturn
from bench.load import Reply
from bench.report import Row, Section
from harness.services import ARTIFACTS, REPO, backend_service, free_port

GUIDELLM = REPO / ".venv-guidellm" / "bin" / "guidellm"
MAX_TOKENS = 128
BURST = 8
LOADS = ((1, 3), (BURST, BURST))  # (streams, requests): 3 one after another; 8 at once
CHAT_USERS = 2
CHAT_TURNS = 4
CHAT_REPLY_TOKENS = 48
CHAT_PROMPT_TOKENS = 200  # new tokens a turn: guidellm's synthetic text, and ...
CHAT_NOTE_WORDS = 190  # ... ours (about a token a word of its word list, plus the question)
ROUNDS = 2
# "Within the noise": a quarter either way, as a ratio (1 / 1.25 = 0.8). Our own client's two
# runs in one run of this section differ that much on this shared 2-core machine (each row shows
# its own two runs' ratio in brackets).
BAND = (0.8, 1.25)
TARGET = f"{BAND[0]}–{BAND[1]}"


class GuideLLMError(RuntimeError):
    """guidellm is missing, failed, or reports failed requests."""


@dataclass(frozen=True)
class Figures:
    """One client's figures for one load."""

    rate: float  # output tokens per second over the load's wall time
    ttft_s: float  # median time to first token
    itl_s: float  # median inter-token latency
    prompt_tokens: int  # the longest prompt of the load


@dataclass(frozen=True)
class Benchmark:
    """One benchmark of guidellm's report."""

    streams: int
    requests: int
    figures: Figures


def parse_report(report: Mapping[str, Any]) -> tuple[str, list[Benchmark]]:
    """guidellm's version and its benchmarks, from its JSON report. Failed requests are an
    error: guidellm itself exits 0 when our API refuses every request."""
    benchmarks = []
    for bench in report["benchmarks"]:
        metrics, requests = bench["metrics"], bench["requests"]
        totals = metrics["request_totals"]
        if totals["errored"] or totals["incomplete"]:
            first = (requests["errored"] or requests["incomplete"])[0]
            raise GuideLLMError(
                f"guidellm: {totals['errored']} requests failed and {totals['incomplete']} did "
                f"not finish; the first: {first['info']['error']}"
            )
        figures = Figures(
            metrics["output_tokens_per_second"]["successful"]["mean"],
            metrics["time_to_first_token_ms"]["successful"]["median"] / 1000,
            metrics["inter_token_latency_ms"]["successful"]["median"] / 1000,
            max(r["prompt_tokens"] for r in requests["successful"]),
        )
        streams = bench["config"]["strategy"]["streams"]
        benchmarks.append(Benchmark(streams, totals["total"], figures))
    return report["metadata"]["guidellm_version"], benchmarks


def run_guidellm(
    url: str, workdir: Path, streams: int, requests: int, data: str, *options: str
) -> tuple[str, Figures]:
    """guidellm's version and figures for `requests` requests from `data` (its `--data`), over
    `streams` at once, on the backend at `url`. Its report is kept in artifacts/. It counts
    tokens with the tokenizer our llamacpp engine converted from the embedded GGUF (no
    download), in one worker process as our client is (by default it starts one a stream, each
    a Python process on these two cores)."""
    if not GUIDELLM.exists():
        raise GuideLLMError(f"{GUIDELLM} is missing: `make bench` installs it")
    tokenizer = tokenizer_cache_dir(embedded_gguf_path(), BackendSettings().cache_dir)
    out = workdir / f"guidellm-{streams}-streams.json"
    backend = {"kind": "openai_http", "target": url, "extras": {"body": {"temperature": 0.7}}}
    command = [
        str(GUIDELLM),
        "run",
        f"--backend={json.dumps(backend)}",
        f"--data={data}",
        f"--profile=kind=concurrent,streams={streams}",
        f"--constraint=kind=max_requests,count={requests}",
        f"--tokenizer=kind=huggingface_auto,model={tokenizer}",
        f"--output=kind=json,path={out}",
        "--disable-console",
        *options,
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "GUIDELLM__MAX_WORKER_PROCESSES": "1"}
    # cwd: guidellm reads a `.env` file from its working directory.
    done = subprocess.run(command, cwd=workdir, env=env, timeout=900, check=False)
    if done.returncode or not out.exists():
        raise GuideLLMError(f"guidellm exited with {done.returncode}: {' '.join(command)}")
    ARTIFACTS.mkdir(exist_ok=True)
    (ARTIFACTS / out.name).write_text(out.read_text())
    version, benchmarks = parse_report(json.loads(out.read_text()))
    if [(b.streams, b.requests) for b in benchmarks] != [(streams, requests)]:
        raise GuideLLMError(f"guidellm ran {benchmarks}, not {requests} requests over {streams}")
    return version, benchmarks[0].figures


def guidellm_load(url: str, workdir: Path, streams: int, requests: int) -> tuple[str, Figures]:
    """guidellm's concurrent profile on a file of the bench's prompt."""
    data = workdir / "prompts.jsonl"
    row = {"prompt": load.PROMPT[0]["content"], "output_tokens_count": MAX_TOKENS}
    # More rows than requests: when the file runs out as the count is reached, guidellm 0.8.1
    # can stop a request short (seen here: 2 of 3); the count is what must stop it.
    data.write_text((json.dumps(row) + "\n") * 2 * requests)
    return run_guidellm(url, workdir, streams, requests, f"kind=json_file,path={data}")


def guidellm_chat(url: str, workdir: Path) -> tuple[str, Figures]:
    """guidellm's multi-turn mode: `CHAT_USERS` synthetic conversations at once."""
    data = (
        f"kind=synthetic_text,prompt_tokens={CHAT_PROMPT_TOKENS},"
        f"output_tokens={CHAT_REPLY_TOKENS},turns={CHAT_TURNS}"
    )
    samples = f"--data-loader=kind=pytorch,samples={CHAT_USERS}"
    return run_guidellm(url, workdir, CHAT_USERS, CHAT_USERS * CHAT_TURNS, data, samples)


async def our_load(url: str, streams: int, requests: int) -> Figures:
    """`streams` users, each sending its next request as soon as its reply is in (guidellm's
    concurrent profile), `requests` in all."""
    async with httpx.AsyncClient(timeout=600) as http:

        async def user(index: int) -> list[Reply]:
            seeds = range(index, requests, streams)
            return [await load.stream(http, url, MAX_TOKENS, seed) for seed in seeds]

        start = time.perf_counter()
        per_user = await asyncio.gather(*(user(i) for i in range(streams)))
        seconds = time.perf_counter() - start
    return figures([r for rs in per_user for r in rs], seconds)


def our_chat(url: str) -> Figures:
    """`bench.multiturn.chat` in guidellm's multi-turn shape."""
    run = asyncio.run(
        multiturn.chat(url, CHAT_USERS, CHAT_TURNS, CHAT_REPLY_TOKENS, CHAT_NOTE_WORDS)
    )
    replies = [r for turn in run.turns for r in turn]
    first_sent = min(r.chunk_times[0] - r.ttft for r in replies)
    return figures(replies, max(r.chunk_times[-1] for r in replies) - first_sent)


def figures(replies: list[Reply], seconds: float) -> Figures:
    """Our replies' figures, as guidellm computes its own."""
    return Figures(
        sum(r.tokens for r in replies) / seconds,
        statistics.median(r.ttft for r in replies),
        statistics.median((r.chunk_times[-1] - r.chunk_times[0]) / (r.tokens - 1) for r in replies),
        max(r.prompt_tokens for r in replies),
    )


def best(runs: list[Figures]) -> Figures:
    """Each figure's best run: the highest rate, the lowest latencies."""
    return Figures(
        max(r.rate for r in runs),
        min(r.ttft_s for r in runs),
        min(r.itl_s for r in runs),
        max(r.prompt_tokens for r in runs),
    )


CHAT = (
    f"multi-turn, {CHAT_USERS} conversations at once, {CHAT_TURNS} turns of "
    f"~{CHAT_PROMPT_TOKENS} new tokens and a {CHAT_REPLY_TOKENS}-token reply"
)


def measure(url: str, workdir: Path) -> tuple[str, list[Row]]:
    """guidellm's version and the rows: each load run by our client then by guidellm, `ROUNDS`
    times (a pair's two runs seconds apart, so they mostly see the same machine)."""

    def ours(streams: int, requests: int) -> Callable[[], Figures]:
        return lambda: asyncio.run(our_load(url, streams, requests))

    def theirs(streams: int, requests: int) -> Callable[[], tuple[str, Figures]]:
        return lambda: guidellm_load(url, workdir, streams, requests)

    loads = [
        *(
            (
                f"{s} stream{'s' * (s > 1)}, {n} requests of {MAX_TOKENS} tokens",
                ours(s, n),
                theirs(s, n),
            )
            for s, n in LOADS
        ),
        (CHAT, lambda: our_chat(url), lambda: guidellm_chat(url, workdir)),
    ]
    asyncio.run(our_load(url, 1, 1))  # a fresh backend's first request is slower
    runs: list[tuple[list[Figures], list[Figures]]] = [([], []) for _ in loads]
    version = ""
    for round_ in range(1, ROUNDS + 1):
        for (name, mine, their), (our_runs, their_runs) in zip(loads, runs, strict=True):
            our_runs.append(mine())
            version, figures = their()
            their_runs.append(figures)
            print(f"round {round_}, {name}: ours {our_runs[-1]}, guidellm {figures}", flush=True)
    rows: list[Row] = []
    for (name, _, _), (our_runs, their_runs) in zip(loads, runs, strict=True):
        rows += comparison_rows(name, their_runs, our_runs)
    return version, rows


def section() -> Section:
    """Start a llamacpp backend, measure it with both clients, stop it."""
    service = backend_service(free_port(), observed=False, LLM_ENGINE="llamacpp")
    service.start()
    try:
        with tempfile.TemporaryDirectory() as tmp:
            version, rows = measure(service.url, Path(tmp))
    finally:
        service.stop()
    return Section(
        "guidellm",
        "guidellm beside our client",
        f"guidellm {version} (PyPI, in a venv of its own) and our client send the same requests "
        f"to one llamacpp backend: the bench's prompt, {MAX_TOKENS} tokens out with "
        f"`ignore_eos`, one stream at a time and {BURST} at once; then guidellm's multi-turn "
        "mode (synthetic conversations, each turn sending the history) beside our multi-turn "
        "client with as many users, turns and tokens. Each load is run by our client then by "
        f"guidellm, {ROUNDS} times, and each figure's best run counts; in brackets, our "
        "client's second run over its first: the noise of this run. Figures as guidellm defines "
        "them: output tokens/s over the load's wall time, median TTFT, median inter-token "
        f"latency. Target: every guidellm / ours ratio within the noise, {TARGET}. guidellm "
        "sends vLLM's `stream_options.continuous_usage_stats`, which the backend honours "
        "(usage so far in every chunk).",
        rows,
    )


def comparison_rows(shape: str, theirs: list[Figures], ours: list[Figures]) -> list[Row]:
    """Per figure: guidellm's best, ours and their ratio, with our runs' spread in brackets."""
    their, mine = best(theirs), best(ours)
    prompt = f"{shape} (longest prompt {their.prompt_tokens} / {mine.prompt_tokens} tokens)"
    rows: list[Row] = []
    for name, pick, show in _FIGURES:
        value = f"{show(pick(their))} / {show(pick(mine))}: {pick(their) / pick(mine):.2f}"
        if len(ours) > 1:
            value += f" ({pick(ours[1]) / pick(ours[0]):.2f})"
        rows.append((f"{prompt}: {name}, guidellm / ours", value, TARGET))
    return rows


_FIGURES: list[tuple[str, Callable[[Figures], float], Callable[[float], str]]] = [
    ("output rate", lambda f: f.rate, lambda v: f"{v:.0f} tok/s"),
    ("TTFT median", lambda f: f.ttft_s, lambda v: f"{v * 1000:.0f} ms"),
    ("inter-token latency median", lambda f: f.itl_s, lambda v: f"{v * 1000:.1f} ms"),
]
