"""`make bench`: the serving figures and their targets, all measured side by side in one run.

Writes `docs/benchmarks.md` (every section, with the commit and the machine it was measured on),
`artifacts/bench.md` (this run's report) and `artifacts/bench.png` (throughput). Figures are
compared as ratios inside the run, because absolute numbers on shared machines are noisy: the
bench compares only what it measures in the same run. `python -m bench multiturn` (or
`structured`, `choices`, `grammars`, `guidellm`) measures that section alone and replaces only
it in `docs/benchmarks.md`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.util
import os
import statistics
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import psutil

from backend.engines.embedded import embedded_gguf_path
from backend.engines.hf import HFEngine, pick_dtype
from backend.settings import BackendSettings
from bench import choices, grammars, guidellm, load, multiturn, raw, report, structured
from bench.load import Run, Saturation
from bench.multiturn import MultiTurn
from bench.report import Provenance, Row, Section
from bench.ui import UITimes, ui_overhead
from harness.services import ARTIFACTS, BackendProcess, backend_service, free_port

MAX_TOKENS = 128
CONCURRENCY = 8
REPEATS = 3  # requests averaged per single-stream figure
TURNS = 3  # questions per user in the concurrent-conversations figure
SATURATING_STREAMS = 400
LONG_PROMPT_WORDS = 1500
MIXED_RUNNING = 4  # mixed load: streams decoding while ...
MIXED_ARRIVALS = 4  # ... this many prompts of LONG_PROMPT_WORDS arrive
ARRIVALS_FIRST_BUDGET = 128  # mixed load again at this LLM_MAX_NUM_BATCHED_TOKENS (llamacpp)
SLOT_CONTEXT = 8192  # llama-server's tokens per slot: our engine's window for the embedded model
CHAT_USERS = 2  # multi-turn: users chatting at once, turns interleaved
CHAT_TURNS = 8  # each adds ~200 prompt tokens of notes and a 48-token reply
ROUND_ROBIN_USERS = 6  # conversations taking turns over ...
ROUND_ROBIN_SEQUENCES = 2  # ... this many llama.cpp sequences (LLM_MAX_BATCH_SIZE)
ROUND_ROBIN_TURNS = 6
MULTI_TURN_THREADS = 1  # engine threads of the multi-turn backends (see multi_turn)

# The targets, shown in the tables and in each section's description.
HTTP1_TARGET = ">= 0.9"  # HTTP 1 stream / raw batch 1
HTTP8_TARGET = {"hf": ">= 0.8", "llamacpp": ">= 0.85"}  # HTTP 8 streams / raw batch 8
SCALING_TARGET = ">= 5x"  # 8 at once / one at a time
USERS_TTFT_TARGET = "<= 2x"  # TTFT of 8 users chatting / of one stream
CONTROL_TARGET = "< 100 ms"  # /healthz and /v1/models p99 under saturation, kubelet-like prober
UI_TARGET = "<= 100 ms"  # the UI's share of time to first token
VERSUS_HF_TARGET = ">= 3x"  # llamacpp / hf, HTTP 1 stream
TURN_GROWTH_TARGET = "<= 1.3"  # TTFT of the last turn / the first, prefix caching on
REUSE_TARGET = ">= 0.9"  # share of each previous turn reused, more conversations than sequences
MASK_TARGET = ">= 0.95"  # free streams' rate beside a constrained one / beside a free one
STRUCTURED_TOKENS = 96  # tokens of every stream in the structured-output batches
STRUCTURED_THREADS = 1  # engine threads there (the other core runs the loop and the mask)
CHOICES_PROMPT_WORDS = 500  # the prompt the choices share (its tokens are in the report)
CHOICES_THREADS = 1
SHARED_PREFILL_TARGET = "<= 0.5"  # first tokens of n choices / of n requests of one prompt
SPREAD_TARGET = "<= 3x"  # mixed load: the running streams' longest inter-token gap / their median
VERSUS_RATE_TARGET = ">= 0.9"  # ours / llama-server, output rate
VERSUS_LATENCY_TARGET = "<= 1.1"  # ours / llama-server, TTFT and inter-token p99


Ceiling = Callable[[], tuple[Run, Run]]


def hf_ceiling() -> tuple[Run, Run]:
    """transformers' own generation at batch 1 and at batch CONCURRENCY."""
    return (
        raw.transformers_generate(1, MAX_TOKENS),
        raw.transformers_generate(CONCURRENCY, MAX_TOKENS),
    )


def llamacpp_ceiling() -> tuple[Run, Run]:
    """llama.cpp's low-level batch API at batch 1 and at batch CONCURRENCY."""
    return raw.llamacpp_batch(1, MAX_TOKENS), raw.llamacpp_batch(CONCURRENCY, MAX_TOKENS)


CEILINGS: dict[str, Ceiling] = {"hf": hf_ceiling, "llamacpp": llamacpp_ceiling}


@dataclass
class Served:
    """What one engine achieves through the real HTTP backend."""

    start_s: float
    # The engine's raw rates measured in this process while the backend is up and idle: what is
    # left of the cores beside Ray's own processes (GCS, raylet, controller, agents).
    beside_idle: tuple[Run, Run]
    single: Run
    burst: Run
    conversations: Run
    peak_rss_bytes: int


def time_engine_starts() -> tuple[float, float]:
    """Seconds to start the hf engine from the GGUF file (cold) and from the converted cache."""
    with tempfile.TemporaryDirectory() as cache:
        times = []
        for _ in range(2):
            engine = HFEngine(BackendSettings(cache_dir=Path(cache)))
            start = time.perf_counter()
            engine.start()
            times.append(time.perf_counter() - start)
            engine.shutdown()
    return times[0], times[1]


class PeakMemory:
    """Samples the summed RSS of a process tree in the background."""

    def __init__(self, pid: int) -> None:
        self._root = psutil.Process(pid)
        self.peak_bytes = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def __enter__(self) -> PeakMemory:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()

    def _sample(self) -> None:
        while not self._stop.wait(0.2):
            processes = [self._root, *self._root.children(recursive=True)]
            total = 0
            for process in processes:
                with contextlib.suppress(psutil.Error):  # a worker may exit while we look
                    total += process.memory_info().rss
            self.peak_bytes = max(self.peak_bytes, total)


def serve(engine: str, extra: Callable[[str], object] | None = None) -> tuple[Served, object]:
    """Start the backend on `engine`, measure it, run `extra(url)` on it, stop it."""
    service = backend_service(free_port(), observed=False, LLM_ENGINE=engine)
    started = time.perf_counter()
    service.start()
    start_s = time.perf_counter() - started
    try:
        beside_idle = CEILINGS[engine]()
        with PeakMemory(service.pid) as memory:
            single = asyncio.run(load.single_streams(service.url, MAX_TOKENS, REPEATS))
            alone_s = single.seconds / REPEATS
            burst = asyncio.run(load.burst(service.url, MAX_TOKENS, CONCURRENCY))
            talks = asyncio.run(
                load.conversations(service.url, MAX_TOKENS, CONCURRENCY, TURNS, alone_s)
            )
        served = Served(start_s, beside_idle, single, burst, talks, memory.peak_bytes)
        return served, extra(service.url) if extra else None
    finally:
        service.stop()


def control_plane_and_ui(url: str) -> tuple[Saturation, Saturation, UITimes]:
    """Health and model info under saturation, probed as a kubelet does (first in line for the
    CPU) and from a process sharing the cores; then the UI's share of time to first token."""
    # Sharing first: the run that follows the other may find its 400 streams still draining,
    # and the target figure should not be the one spared that.
    sharing = asyncio.run(load.saturation(url, SATURATING_STREAMS, 10))
    kubelet = asyncio.run(load.saturation(url, SATURATING_STREAMS, 10, prober_first=True))
    return kubelet, sharing, ui_overhead(url)


def engines() -> list[str]:
    """The CPU engines installed here."""
    return ["hf", *(["llamacpp"] if importlib.util.find_spec("llama_cpp") else [])]


def engine_section(name: str, served: Served, raw1: Run, raw8: Run) -> Section:
    """One engine through the real HTTP backend, against its own speed in-process."""
    s = served
    rows: list[Row] = [
        (f"{name}: start to /healthz 200", f"{s.start_s:.1f} s", ""),
        (
            f"{name}: raw in-process, batch 1 / batch {CONCURRENCY}",
            f"{raw1.rate:.0f} / {raw8.rate:.0f} tok/s",
            "",
        ),
        (
            f"{name}: HTTP, 1 stream (mean of {REPEATS}) / {CONCURRENCY} at once",
            f"{s.single.rate:.0f} / {s.burst.rate:.0f} tok/s",
            "",
        ),
        (
            f"{name}: HTTP 1 stream / raw batch 1",
            f"{s.single.rate / raw1.rate:.2f}",
            HTTP1_TARGET,
        ),
        (
            f"{name}: HTTP {CONCURRENCY} streams / raw batch {CONCURRENCY}",
            f"{s.burst.rate / raw8.rate:.2f}",
            HTTP8_TARGET[name],
        ),
        (
            f"{name}: {CONCURRENCY} at once / one at a time (the engine's own: raw batch "
            f"{CONCURRENCY} / batch 1)",
            f"{s.burst.rate / s.single.rate:.1f}x ({raw8.rate / raw1.rate:.1f}x)",
            SCALING_TARGET,
        ),
        *idle_share_rows(name, served, raw1, raw8),
        (f"{name}: TTFT p50, 1 stream", f"{s.single.ttft_p50 * 1000:.0f} ms", ""),
        (
            f"{name}: TTFT p50, {CONCURRENCY} users chatting ({TURNS} turns each, staggered)",
            f"{s.conversations.ttft_p50 * 1000:.0f} ms "
            f"({s.conversations.ttft_p50 / s.single.ttft_p50:.1f}x)",
            USERS_TTFT_TARGET,
        ),
        (
            f"{name}: TTFT p50, {CONCURRENCY} sent in the same instant",
            f"{s.burst.ttft_p50 * 1000:.0f} ms ({s.burst.ttft_p50 / s.single.ttft_p50:.1f}x)",
            "",
        ),
        (
            f"{name}: peak RSS of the backend process tree",
            f"{s.peak_rss_bytes / 2**30:.2f} GiB",
            "",
        ),
    ]
    return Section(
        f"engine-{name}",
        f"The `{name}` engine through HTTP",
        f"The engine's own rate in this process (no server: the ceiling) against the same through "
        f"the real backend, then concurrency, time to first token and memory. Targets: HTTP / raw "
        f"{HTTP1_TARGET} for one stream and {HTTP8_TARGET[name]} for {CONCURRENCY}, {CONCURRENCY} "
        f"at once {SCALING_TARGET} one at a time, TTFT of {CONCURRENCY} users chatting "
        f"{USERS_TTFT_TARGET} one stream's.",
        rows,
    )


def idle_share_rows(name: str, served: Served, raw1: Run, raw8: Run) -> list[Row]:
    """The HTTP/raw gap split in two: the cores Ray's idle processes take, and the request path."""
    idle1, idle8 = served.beside_idle
    return [
        (
            f"{name}: raw in-process beside the idle backend, batch 1 / {CONCURRENCY} "
            "(share of raw alone)",
            f"{idle1.rate:.0f} / {idle8.rate:.0f} tok/s "
            f"({idle1.rate / raw1.rate:.2f} / {idle8.rate / raw8.rate:.2f})",
            "",
        ),
        (
            f"{name}: HTTP / raw beside the idle backend, 1 stream / {CONCURRENCY} "
            "(the request path's own cost)",
            f"{served.single.rate / idle1.rate:.2f} / {served.burst.rate / idle8.rate:.2f}",
            "",
        ),
    ]


def multi_turn(engine: str) -> tuple[MultiTurn, MultiTurn]:
    """The same conversations with prefix caching and without, each on a fresh backend. One
    engine thread: the other cores serve Ray and the clients, so the engine's steps are not
    stretched by whoever else runs (its threads spin-wait for each other)."""
    runs = []
    for caching in ("true", "false"):
        service = backend_service(
            free_port(),
            observed=False,
            LLM_ENGINE=engine,
            LLM_PREFIX_CACHING=caching,
            LLM_CPU_THREADS=str(MULTI_TURN_THREADS),
        )
        service.start()
        try:
            runs.append(asyncio.run(multiturn.chat(service.url, CHAT_USERS, CHAT_TURNS)))
            ttfts = [f"{runs[-1].ttft(t) * 1000:.0f}" for t in range(1, CHAT_TURNS + 1)]
            print(f"{engine}, prefix caching {caching}: TTFT by turn (ms)", *ttfts, flush=True)
        finally:
            service.stop()
    return runs[0], runs[1]


def round_robin() -> MultiTurn:
    """More llamacpp conversations than sequences: the host-memory copies must serve them."""
    service = backend_service(
        free_port(),
        observed=False,
        LLM_ENGINE="llamacpp",
        LLM_MAX_BATCH_SIZE=str(ROUND_ROBIN_SEQUENCES),
        LLM_CPU_THREADS=str(MULTI_TURN_THREADS),
    )
    service.start()
    try:
        return asyncio.run(multiturn.round_robin(service.url, ROUND_ROBIN_USERS, ROUND_ROBIN_TURNS))
    finally:
        service.stop()


def multi_turn_section() -> Section:
    """Time to first token as conversations grow, with and without prefix caching."""
    rows: list[Row] = []
    threads = f"{MULTI_TURN_THREADS} thread{'s' if MULTI_TURN_THREADS > 1 else ''}"
    for engine in engines():
        cached, uncached = multi_turn(engine)
        last = CHAT_TURNS
        rows += [
            (
                f"{engine} ({threads}): multi-turn, {CHAT_USERS} users, turns interleaved: "
                f"TTFT turn {last} / turn 1 (prompt {cached.prompt_tokens(1)} -> "
                f"{cached.prompt_tokens(last)} tokens), prefix caching on",
                f"{_growth(cached)}; hit rate {cached.hit_rate():.2f}, "
                f"{cached.reuse():.2f} of each previous turn reused",
                TURN_GROWTH_TARGET,
            ),
            ("... the same conversations with LLM_PREFIX_CACHING=false", _growth(uncached), ""),
        ]
        if engine == "llamacpp":
            new = cached.prompt_tokens(last) - min(r.cached_tokens for r in cached.turns[last - 1])
            history = cached.prompt_tokens(last) - new
            floor = multiturn.llamacpp_prefill_floor(new, history, MULTI_TURN_THREADS)
            rows.append(
                (
                    f"llamacpp: compute floor, in-process, {threads}: {new} new tokens "
                    f"prefilled after {history} cached / from position 0 "
                    "(attention over the history, which no cache saves)",
                    f"{floor:.2f}",
                    "",
                )
            )
    many = round_robin()
    rows.append(
        (
            f"llamacpp: {ROUND_ROBIN_USERS} conversations taking turns over "
            f"{ROUND_ROBIN_SEQUENCES} sequences, {ROUND_ROBIN_TURNS} turns (prompt "
            f"{many.prompt_tokens(1)} -> {many.prompt_tokens(ROUND_ROBIN_TURNS)} tokens): share "
            "of each previous turn reused (host-memory copies) / hit rate",
            f"{many.reuse():.2f} / {many.hit_rate():.2f}",
            REUSE_TARGET,
        )
    )
    return Section(
        "multiturn",
        "Multi-turn conversations and prefix caching",
        f"Time to first token as {CHAT_USERS} conversations grow over {CHAT_TURNS} turns, with "
        "prefix caching and without, against the compute floor no cache saves; then more "
        f"conversations than llama.cpp has sequences. Targets: TTFT at turn {CHAT_TURNS} / turn "
        f"1 {TURN_GROWTH_TARGET} with prefix caching, {REUSE_TARGET} of each previous turn "
        f"reused when {ROUND_ROBIN_USERS} conversations take turns over {ROUND_ROBIN_SEQUENCES} "
        "sequences.",
        rows,
    )


def structured_section() -> Section:
    """The grammar mask's cost to the streams beside a constrained one, and its own rate."""
    cost = structured.mask_cost(STRUCTURED_TOKENS, STRUCTURED_THREADS)
    threads = f"{STRUCTURED_THREADS} thread{'s' if STRUCTURED_THREADS > 1 else ''}"
    return Section(
        "structured",
        "Structured output",
        f"In-process llama.cpp ({threads}), a batch of {structured.BATCH} streams of "
        f"{STRUCTURED_TOKENS} tokens: the free streams' rate with one stream constrained by a "
        "JSON schema beside them, over the same batch all free (the mask's cost to its "
        f"neighbours; target {MASK_TARGET}), and the constrained stream's own rate.",
        [
            (
                f"llamacpp: {structured.BATCH - 1} free streams beside a constrained one / "
                "beside a free one (tokens/s)",
                f"{cost.free_beside_constrained / cost.free_alone:.2f} "
                f"({cost.free_beside_constrained:.0f} / {cost.free_alone:.0f})",
                MASK_TARGET,
            ),
            ("llamacpp: the constrained stream's own rate", f"{cost.constrained:.1f} tok/s", ""),
        ],
    )


def choices_section() -> Section:
    """One request of several choices against as many requests of the same prompt."""
    n = choices.CHOICES
    shared = choices.shared_prefill(CHOICES_PROMPT_WORDS, CHOICES_THREADS)
    return Section(
        "choices",
        "Several choices of one prompt",
        f"In-process llama.cpp ({CHOICES_THREADS} thread), a prompt of about "
        f"{shared.computed_together} tokens: one request with `n={n}` against {n} requests of "
        "the prompt sent at once, until every choice has its first token. The choices prefill "
        f"the prompt once and copy its KV (target {SHARED_PREFILL_TARGET}); the requests "
        "each compute it.",
        [
            (
                f"llamacpp: first tokens of n={n} / of {n} requests",
                f"{shared.together_s / shared.apart_s:.2f} "
                f"({shared.together_s:.1f} / {shared.apart_s:.1f} s)",
                SHARED_PREFILL_TARGET,
            ),
            (
                "llamacpp: prompt tokens computed, n choices / n requests",
                f"{shared.computed_together} / {shared.computed_apart}",
                "",
            ),
        ],
    )


def _growth(run: MultiTurn) -> str:
    first, last = run.ttft(1), run.ttft(len(run.turns))
    return f"{last / first:.2f} ({first * 1000:.0f} -> {last * 1000:.0f} ms)"


def start_section(cold: float, cached: float) -> Section:
    """How long the hf engine takes to load the embedded model."""
    return Section(
        "start",
        "Engine start",
        "Seconds for the `hf` engine to load the embedded model: the first time (converting the "
        "GGUF) and from the converted cache. No target: reported so that a change shows.",
        [("hf: engine start, cold (GGUF conversion) / cached", f"{cold:.1f} / {cached:.1f} s", "")],
    )


def engine_settings() -> list[str]:
    """The engines' thread and number-format settings the bench runs with (the shell's `LLM_*`
    reach the backends it starts), for the report's machine description."""
    import torch

    settings = BackendSettings()
    served = f"`LLM_CPU_THREADS={settings.cpu_threads}`"
    if not settings.cpu_threads:
        served += " (the cores Ray grants the model deployment)"
    dtype = str(pick_dtype(settings.dtype)).removeprefix("torch.")
    return [
        f"Engine threads: backends {served}, multi-turn section "
        f"`LLM_CPU_THREADS={MULTI_TURN_THREADS}`; in-process ceilings: torch "
        f"{torch.get_num_threads()}, llama.cpp {len(os.sched_getaffinity(0))}",
        f"hf number format: `LLM_DTYPE={settings.dtype}` ({dtype})",
    ]


def main() -> None:
    """Run every measurement and write the report (`multiturn`: that section only)."""
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n")[0])
    alone: dict[str, Callable[[], Section]] = {
        "multiturn": multi_turn_section,
        "mixed": mixed_section,
        "llama-server": llama_server_section,
        "structured": structured_section,
        "choices": choices_section,
        "grammars": grammars.section,
        "guidellm": guidellm.section,
    }
    parser.add_argument(
        "sections",
        nargs="*",
        choices=list(alone),
        help="measure these sections alone and replace only them in docs/benchmarks.md",
    )
    args = parser.parse_args()
    provenance = Provenance.current()  # the tree as measured, before the bench writes anything
    if args.sections:
        write_report([alone[name]() for name in args.sections], {}, provenance, whole=False)
        return
    cold, cached = time_engine_starts()
    ceilings = {engine: CEILINGS[engine]() for engine in engines()}
    print("ceilings:", {e: [f"{r.rate:.0f} tok/s" for r in runs] for e, runs in ceilings.items()})
    sections = [start_section(cold, cached)]
    control: list[Section] = []
    served: dict[str, Served] = {}
    default = BackendSettings().engine
    for engine in engines():
        extra = control_plane_and_ui if engine == default else None
        served[engine], measured = serve(engine, extra)
        measured_now = [engine_section(engine, served[engine], *ceilings[engine])]
        if measured is not None:
            measured_now.append(control_section(engine, *measured))
        sections.append(measured_now[0])
        control += measured_now[1:]
        for section in measured_now:
            print(report.table(section.rows), flush=True)  # so far, in case
    sections += control
    if "llamacpp" in served:
        sections.append(llamacpp_section(served))
    sections.append(mixed_section())
    if "llamacpp" in served:
        sections.append(llama_server_section())
    sections.append(multi_turn_section())
    sections.append(structured_section())
    sections.append(choices_section())
    sections.append(grammars.section())
    sections.append(guidellm.section())
    write_report(sections, served, provenance, whole=True)


def llamacpp_section(served: dict[str, Served]) -> Section:
    """Our llamacpp engine against hf, and against llama-cpp-python's own server."""
    from bench.llamacpp import llamacpp_server

    ours = served["llamacpp"]
    # That server has no `ignore_eos`: the end tokens are banned instead, for equal lengths.
    no_end = {"logit_bias": {str(t): -100 for t in (0, 2, 4)}}
    with llamacpp_server(embedded_gguf_path()) as url:
        single = asyncio.run(load.single_streams(url, MAX_TOKENS, REPEATS, no_end))
        burst = asyncio.run(load.burst(url, MAX_TOKENS, CONCURRENCY, no_end))
    rows: list[Row] = [
        (
            "llamacpp / hf, HTTP 1 stream",
            f"{ours.single.rate / served['hf'].single.rate:.1f}x",
            VERSUS_HF_TARGET,
        ),
        (
            f"llama-cpp-python's server, 1 stream / {CONCURRENCY} at once",
            f"{single.rate:.0f} / {burst.rate:.0f} tok/s",
            "",
        ),
        (
            f"our llamacpp / llama-cpp-python's server, 1 stream / {CONCURRENCY} at once",
            f"{ours.single.rate / single.rate:.2f} / {ours.burst.rate / burst.rate:.2f}",
            "",
        ),
    ]
    return Section(
        "llamacpp-comparison",
        "`llamacpp` against `hf` and llama-cpp-python's server",
        "Our llamacpp engine's HTTP rate against the hf engine's, and against the OpenAI server "
        "that ships with llama-cpp-python (same GGUF, same threads, one request at a time). "
        f"Target: llamacpp {VERSUS_HF_TARGET} hf for one stream.",
        rows,
    )


def matched_backend(
    engine: str,
    threads: int | None = None,
    stream_interval_ms: str | None = "0",
    **settings: str,
) -> BackendProcess:
    """Our backend as llama-server runs beside it: the same threads and batch (slots), and by
    default every decode step streamed as it comes (`LLM_STREAM_INTERVAL_MS=0`: a chunk is a
    token, as llama-server sends them, so chunk gaps are inter-token gaps); None keeps our
    defaults (text merged every 50 ms after the first, less often with many streams).
    `settings` (env) are set besides."""
    defaults = BackendSettings()
    interval = (
        {}
        if stream_interval_ms is None
        else {"LLM_STREAM_INTERVAL_MS": stream_interval_ms, "LLM_STREAM_UPDATES_PER_S": "0"}
    )
    return backend_service(
        free_port(),
        observed=False,
        LLM_ENGINE=engine,
        LLM_CPU_THREADS=str(threads or defaults.cpu_threads or len(os.sched_getaffinity(0))),
        LLM_MAX_BATCH_SIZE=str(defaults.max_batch_size),
        **interval,
        **settings,
    )


def mixed(url: str) -> load.Mixed:
    """The mixed load on a server."""
    return asyncio.run(load.mixed_load(url, LONG_PROMPT_WORDS, MIXED_RUNNING, MIXED_ARRIVALS))


def mixed_rows(name: str, measured: load.Mixed) -> list[Row]:
    """The running streams' gaps alone and while the prompts arrive, and the arrivals' TTFT."""
    steady, during, ttfts = measured.steady, measured.during, measured.arrival_ttfts
    return [
        (
            f"{name}: {MIXED_RUNNING} running streams' inter-token gap, median decoding alone; "
            f"median / p99 / max while {MIXED_ARRIVALS} prompts of ~{LONG_PROMPT_WORDS} words "
            f"({measured.arrival_tokens} tokens) arrive",
            f"{steady.median * 1000:.0f}; {during.median * 1000:.0f} / "
            f"{during.p99 * 1000:.0f} / {during.max * 1000:.0f} ms",
            "",
        ),
        (
            "... longest gap / median gap, over the streams' whole run (alone, then during)",
            f"{measured.spread:.1f}x",
            SPREAD_TARGET,
        ),
        (
            "... longest gap while they arrive / median alone (stricter: no target)",
            f"{measured.stall:.1f}x",
            "",
        ),
        (
            "... the arriving prompts' TTFT, median / max",
            f"{statistics.median(ttfts) * 1000:.0f} / {max(ttfts) * 1000:.0f} ms",
            "",
        ),
    ]


def mixed_section() -> Section:
    """Each engine's running streams while long prompts arrive."""
    rows: list[Row] = []
    runs = [(engine, {}) for engine in engines()]
    if "llamacpp" in engines():  # the step budget's trade: steady streams against the arrivals
        runs.append(("llamacpp", {"LLM_MAX_NUM_BATCHED_TOKENS": str(ARRIVALS_FIRST_BUDGET)}))
    for engine, settings in runs:
        service = matched_backend(engine, **settings)
        service.start()
        try:
            name = " ".join([engine, *(f"{k}={v}" for k, v in settings.items())])
            rows += mixed_rows(name, mixed(service.url))
        finally:
            service.stop()
    return Section(
        "mixed",
        "Mixed load: decoding while long prompts arrive",
        f"{MIXED_RUNNING} streams decoding, alone for a few seconds, then while {MIXED_ARRIVALS} "
        f"prompts of ~{LONG_PROMPT_WORDS} words (each its own) arrive at once: the running "
        "streams' gaps between tokens alone, and from the first arrival sent to the last one's "
        "reply (every decode step streamed: `LLM_STREAM_INTERVAL_MS=0`, "
        "`LLM_STREAM_UPDATES_PER_S=0`), and the arrivals' time "
        "to first token. Target: the running streams' longest gap / their median gap over "
        f"their whole run {SPREAD_TARGET}; the stricter longest gap while they arrive / median "
        f"alone is shown beside it. llama.cpp runs again with a step budget of "
        f"{ARRIVALS_FIRST_BUDGET} tokens: longer steps, so longer gaps, and sooner first tokens "
        "for the arrivals (the default budget keeps the gaps within the target).",
        rows,
    )


@dataclass
class Versus:
    """One server's figures in the llama-server comparison."""

    single: Run
    burst: Run
    last_turn_ttft_s: float
    mixed: load.Mixed | None  # measured at the full thread count only


def versus(url: str, with_mixed: bool) -> Versus:
    """Output rate at 1 and CONCURRENCY streams, multi-turn TTFT, and the mixed load if asked."""
    single = asyncio.run(load.single_streams(url, MAX_TOKENS, REPEATS))
    burst = asyncio.run(load.burst(url, MAX_TOKENS, CONCURRENCY))
    talk = asyncio.run(multiturn.chat(url, CHAT_USERS, CHAT_TURNS))
    return Versus(single, burst, talk.ttft(CHAT_TURNS), mixed(url) if with_mixed else None)


def both_servers(threads: int, slots: int, with_mixed: bool) -> tuple[Versus, Versus]:
    """Ours, then llama-server, each alone on the machine with `threads` engine threads. Ours
    runs rates and multi-turn at its defaults, the mixed load with every token streamed."""
    from bench.llama_server import llama_server

    service = matched_backend("llamacpp", threads, stream_interval_ms=None)
    service.start()
    try:
        ours = versus(service.url, with_mixed=False)
    finally:
        service.stop()
    if with_mixed:
        service = matched_backend("llamacpp", threads)
        service.start()
        try:
            ours.mixed = mixed(service.url)
        finally:
            service.stop()
    gguf = embedded_gguf_path()
    with llama_server(gguf, threads=threads, slots=slots, slot_context=SLOT_CONTEXT) as url:
        theirs = versus(url, with_mixed)
    return ours, theirs


def versus_rows(at: str, ours: Versus, theirs: Versus) -> list[Row]:
    """Each server's figures, then ours / theirs against the targets."""
    rows: list[Row] = []
    for name, got in ((f"ours (llamacpp){at}", ours), (f"llama-server{at}", theirs)):
        rows += [
            (
                f"{name}: output rate, 1 stream / {CONCURRENCY} at once",
                f"{got.single.rate:.0f} / {got.burst.rate:.0f} tok/s",
                "",
            ),
            (
                f"{name}: multi-turn TTFT at turn {CHAT_TURNS} ({CHAT_USERS} users)",
                f"{got.last_turn_ttft_s * 1000:.0f} ms",
                "",
            ),
            *(mixed_rows(name, got.mixed) if got.mixed else []),
        ]
    rows += [
        (
            f"ours / llama-server{at}: output rate, 1 stream / {CONCURRENCY} at once",
            f"{ours.single.rate / theirs.single.rate:.2f} / "
            f"{ours.burst.rate / theirs.burst.rate:.2f}",
            VERSUS_RATE_TARGET,
        ),
        (
            f"ours / llama-server{at}: multi-turn TTFT at turn {CHAT_TURNS}",
            f"{ours.last_turn_ttft_s / theirs.last_turn_ttft_s:.2f}",
            VERSUS_LATENCY_TARGET,
        ),
    ]
    if ours.mixed and theirs.mixed:
        rows.append(
            (
                f"ours / llama-server{at}: mixed load, running streams' inter-token p99",
                f"{ours.mixed.during.p99 / theirs.mixed.during.p99:.2f}",
                VERSUS_LATENCY_TARGET,
            )
        )
    return rows


def llama_server_section() -> Section:
    """Our llamacpp backend against llama.cpp's own C++ server, same GGUF, threads and slots;
    again at one thread, where the other cores serve Ray and the client."""
    from bench.llama_server import VERSION

    settings = BackendSettings()
    threads = settings.cpu_threads or len(os.sched_getaffinity(0))
    slots = settings.max_batch_size
    rows = versus_rows("", *both_servers(threads, slots, with_mixed=True))
    if threads > 1:
        rows += versus_rows(", 1 thread", *both_servers(1, slots, with_mixed=False))
    return Section(
        "llama-server",
        "`llamacpp` against llama.cpp's own server",
        f"Our backend on the `llamacpp` engine against `llama-server` of the same llama.cpp "
        f"(built from llama-cpp-python {VERSION}'s sources, CPU, Release), same GGUF, "
        f"{threads} threads and {slots} slots (`--parallel`, `--cont-batching`, otherwise its "
        "defaults), over `/v1/chat/completions` streamed. Ours runs rates and multi-turn at its "
        "defaults (the first text at once, then text merged every 50 ms, or less often where "
        "the streams would pass 40 items/s together: llama-server sends every token as an "
        "event of its own) and the mixed load with every decode step streamed "
        "(`LLM_STREAM_INTERVAL_MS=0`, `LLM_STREAM_UPDATES_PER_S=0`), so its gaps are "
        "inter-token gaps. Both split threads as "
        "our engine does: a batch of one token on one thread fewer. "
        f"Rates: {MAX_TOKENS} tokens a stream; multi-turn as in "
        f"the multi-turn section but at {threads} threads; mixed load as in its own section. "
        "Rates and multi-turn again with one engine thread on both sides (where the machine has "
        "more): the other cores then serve Ray's processes and the client, so the ratio shows "
        "what our request path costs rather than what Ray takes from the engine's cores. "
        f"Targets: ours / llama-server {VERSUS_RATE_TARGET} on rates, {VERSUS_LATENCY_TARGET} "
        "on latencies.",
        rows,
    )


def control_section(engine: str, kubelet: Saturation, sharing: Saturation, ui: UITimes) -> Section:
    """The saturation and UI figures."""
    how = (
        "first in line for the CPU, as a kubelet"
        if kubelet.prober_first
        else "NOT first in line for the CPU here (SCHED_FIFO not permitted)"
    )
    rows: list[Row] = [
        (
            f"{engine}: /healthz p99 / /v1/models p99 with {SATURATING_STREAMS} streams open, "
            f"probed {how}",
            _control_p99(kubelet),
            CONTROL_TARGET,
        ),
        (
            "... probed from a process sharing the model's cores (its own wait for a CPU included)",
            _control_p99(sharing),
            "",
        ),
        (
            f"{engine}: slowest /healthz or /v1/models probe while the {SATURATING_STREAMS} "
            f"streams are admitted (their first 2 s), probed {how} / sharing the cores",
            f"{kubelet.admission_max * 1000:.0f} / {sharing.admission_max * 1000:.0f} ms",
            "",
        ),
        (
            "TTFT: browser (Enter to text shown) / backend over HTTP, median",
            f"{ui.browser_s * 1000:.0f} / {ui.direct_s * 1000:.0f} ms",
            "",
        ),
        (
            "UI overhead on time to first token: browser less backend over HTTP",
            f"{(ui.browser_s - ui.direct_s) * 1000:.0f} ms",
            UI_TARGET,
        ),
        (
            "... of it the UI's own: browser less the UI's own wait for its first token "
            "(its stats line; the rest is the model slowed by Chromium and Gradio on its cores)",
            f"{ui.own_s * 1000:.0f} ms",
            UI_TARGET,
        ),
    ]
    return Section(
        "control",
        "Health, model info and the UI under load",
        f"`/healthz` and `/v1/models` while the {engine} backend holds {SATURATING_STREAMS} "
        "streams, probed from a process of its own (first in line for the CPU, as a kubelet, "
        "and sharing the cores), then the UI's share of time to first token in Chromium. "
        f"Targets: probe p99 {CONTROL_TARGET} probed as a kubelet, UI overhead {UI_TARGET}.",
        rows,
    )


def _control_p99(saturated: Saturation) -> str:
    return (
        f"{saturated.health_p99 * 1000:.0f} / {saturated.models_p99 * 1000:.0f} ms "
        f"({saturated.health_failures} failed probes, {saturated.refused} streams refused 503)"
    )


def write_report(
    sections: list[Section], served: dict[str, Served], provenance: Provenance, *, whole: bool
) -> None:
    """This run's report in `artifacts/bench.md`, folded into `docs/benchmarks.md` (all of it
    if the run was `whole`, else only its sections), and the throughput as a bar chart."""
    machine = report.machine(engine_settings())
    text = report.write(sections, provenance, machine, whole=whole, artifact=ARTIFACTS / "bench.md")
    print(text, f"written: {report.DOCS.relative_to(report.REPO)}, artifacts/bench.md", sep="\n")
    if served:
        write_chart(served)


def write_chart(served: dict[str, Served]) -> None:
    """Throughput over HTTP of each engine, as `artifacts/bench.png`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    bars = {
        f"{engine}, {label}": run.rate
        for engine, s in served.items()
        for label, run in (
            ("1 stream", s.single),
            (f"{CONCURRENCY} at once", s.burst),
            (f"{CONCURRENCY} users", s.conversations),
        )
    }
    figure, axis = plt.subplots(figsize=(8, 4))
    axis.barh(list(bars), list(bars.values()), color="#4c72b0")
    axis.set_xlabel("completion tokens / s over HTTP")
    axis.set_title("SmolLM2-135M-Instruct on this CPU (higher is better)")
    figure.tight_layout()
    ARTIFACTS.mkdir(exist_ok=True)
    figure.savefig(ARTIFACTS / "bench.png", dpi=120)


if __name__ == "__main__":
    main()
