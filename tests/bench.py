"""`make bench`: start-up, single-stream and batched throughput, memory; all measured in one run.

Writes `artifacts/bench.md` (a table) and `artifacts/bench.png` (a plot). Figures are compared
as ratios inside the run, because absolute numbers on shared machines are noisy.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import statistics
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import psutil

from backend.engines.hf import HFEngine
from backend.generation import SamplingParams
from backend.settings import BackendSettings
from tests.e2e.services import (
    ARTIFACTS,
    BOT,
    ServiceProcess,
    backend_service,
    free_port,
    launch_chromium,
    ui_service,
)

PROMPT = [{"role": "user", "content": "Write a long, detailed story about a lighthouse keeper."}]
MAX_TOKENS = 128
CONCURRENCY = 8


@dataclass
class Run:
    """Tokens produced and the wall time it took."""

    tokens: int
    seconds: float

    @property
    def rate(self) -> float:
        return self.tokens / self.seconds


def time_engine_starts() -> tuple[float, float]:
    """Seconds to start the engine from the GGUF file (cold) and from the converted cache."""
    with tempfile.TemporaryDirectory() as cache:
        times = []
        for _ in range(2):
            engine = HFEngine(BackendSettings(cache_dir=Path(cache)))
            start = time.perf_counter()
            engine.start()
            times.append(time.perf_counter() - start)
            engine.shutdown()
    return times[0], times[1]


async def engine_single_stream() -> Run:
    """One stream, the engine called directly in this process."""
    engine = HFEngine(BackendSettings())
    engine.start()
    prompt = engine.encode_chat(PROMPT)
    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0)
    async for _ in engine.generate(prompt, params):  # warm-up
        pass
    start = time.perf_counter()
    tokens = sum([d.tokens async for d in engine.generate(prompt, params)])
    run = Run(tokens, time.perf_counter() - start)
    engine.shutdown()
    return run


async def http_stream(http: httpx.AsyncClient, url: str, seed: int) -> int:
    """One streamed request; returns the completion tokens from the usage chunk."""
    body = {
        "messages": PROMPT,
        "max_tokens": MAX_TOKENS,
        "temperature": 0.7,
        "seed": seed,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    tokens = 0
    async with http.stream("POST", url + "/v1/chat/completions", json=body) as response:
        async for line in response.aiter_lines():
            if '"usage"' in line:
                tokens = httpx.Response(200, content=line[6:]).json()["usage"]["completion_tokens"]
    return tokens


async def http_runs(url: str) -> dict[str, Run]:
    """Single stream, N streams one after another, and N streams at once, over HTTP."""
    runs: dict[str, Run] = {}
    async with httpx.AsyncClient(timeout=600) as http:
        await http_stream(http, url, 0)  # warm-up
        start = time.perf_counter()
        tokens = await http_stream(http, url, 1)
        runs["http, 1 stream"] = Run(tokens, time.perf_counter() - start)
        start = time.perf_counter()
        tokens = sum([await http_stream(http, url, s) for s in range(CONCURRENCY)])
        runs[f"http, {CONCURRENCY} streams one by one"] = Run(tokens, time.perf_counter() - start)
        start = time.perf_counter()
        results = await asyncio.gather(*(http_stream(http, url, s) for s in range(CONCURRENCY)))
        runs[f"http, {CONCURRENCY} streams at once"] = Run(
            sum(results), time.perf_counter() - start
        )
    return runs


UI_PROMPT = "What is the capital of France?"
UI_REPEATS = 5
# Marks the moment Enter goes down in the message box, and the moment the first text of a new
# answer appears in the chat, both on the page's own clock.
_FIRST_TOKEN_PROBE = """
() => {
  const box = document.querySelector('#msg textarea');
  const mark = e => { if (e.key === 'Enter') window.__sent = performance.now(); };
  box.addEventListener('keydown', mark, {capture: true, once: true});
  const before = document.querySelectorAll(__BOT__).length;
  window.__first = null;
  new MutationObserver((_, observer) => {
    const bots = document.querySelectorAll(__BOT__);
    if (bots.length > before && bots[bots.length - 1].innerText.trim()) {
      window.__first = performance.now();
      observer.disconnect();
    }
  }).observe(document.querySelector('#chatbot'), {subtree: true, childList: true,
                                                  characterData: true});
}
""".replace("__BOT__", repr(BOT))


async def backend_ttft(url: str) -> float:
    """Seconds from sending the request to the first content chunk, straight to the backend."""
    body = {
        "messages": [{"role": "user", "content": UI_PROMPT}],
        "max_tokens": 32,
        "temperature": 0,
        "stream": True,
    }
    async with httpx.AsyncClient(timeout=120) as http:
        start = time.perf_counter()
        async with http.stream("POST", url + "/v1/chat/completions", json=body) as response:
            async for line in response.aiter_lines():
                if '"content"' in line and '"content": ""' not in line:
                    return time.perf_counter() - start
    raise RuntimeError("no content arrived")


def browser_ttft(ui: ServiceProcess) -> list[float]:
    """Seconds from pressing Enter to the first token shown in Chromium, one per repeat."""
    from playwright.sync_api import expect, sync_playwright

    times = []
    with sync_playwright() as playwright:
        browser = launch_chromium(playwright)
        page = browser.new_page()
        page.goto(ui.url)
        page.locator("#status").get_by_text("SmolLM2").wait_for(timeout=60_000)
        for _ in range(UI_REPEATS + 1):  # the first is a warm-up
            page.locator("#new-chat").click()
            page.wait_for_function(f"document.querySelectorAll({BOT!r}).length === 0")
            page.evaluate(_FIRST_TOKEN_PROBE)
            page.locator("#msg textarea").fill(UI_PROMPT)
            page.locator("#msg textarea").press("Enter")
            page.wait_for_function("window.__first !== null", timeout=120_000)
            times.append(page.evaluate("(window.__first - window.__sent) / 1000"))
            expect(page.locator("#stop")).to_be_disabled(timeout=120_000)  # answer done
        browser.close()
    return times[1:]


def ui_overhead(backend_url: str) -> tuple[float, float]:
    """Median time to first token through the UI in a browser, and straight from the backend."""
    ui = ui_service(free_port(), backend_url, temperature="0", max_tokens="32")
    ui.start()
    try:
        direct = [asyncio.run(backend_ttft(backend_url)) for _ in range(UI_REPEATS + 1)][1:]
        through_ui = browser_ttft(ui)
    finally:
        ui.stop()
    return statistics.median(through_ui), statistics.median(direct)


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


def write_report(rows: list[tuple[str, str]], runs: dict[str, Run]) -> None:
    """The table as Markdown and the throughput as a bar chart."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ARTIFACTS.mkdir(exist_ok=True)
    table = ["| measure | value |", "|---|---|", *(f"| {k} | {v} |" for k, v in rows)]
    (ARTIFACTS / "bench.md").write_text("\n".join(table) + "\n")
    print("\n".join(table))
    figure, axis = plt.subplots(figsize=(8, 4))
    axis.barh(list(runs), [r.rate for r in runs.values()], color="#4c72b0")
    axis.set_xlabel("completion tokens / s")
    axis.set_title("SmolLM2-135M-Instruct on this CPU (higher is better)")
    figure.tight_layout()
    figure.savefig(ARTIFACTS / "bench.png", dpi=120)


def main() -> None:
    """Run every measurement and write the report."""
    cold, cached = time_engine_starts()
    runs = {"engine in-process, 1 stream": asyncio.run(engine_single_stream())}
    service = backend_service(free_port())
    started = time.perf_counter()
    service.start()
    serve_start = time.perf_counter() - started
    try:
        with PeakMemory(service.pid) as memory:
            runs.update(asyncio.run(http_runs(service.url)))
        ui_ttft, backend_ttft_s = ui_overhead(service.url)
    finally:
        service.stop()
    single = runs["http, 1 stream"]
    engine = runs["engine in-process, 1 stream"]
    at_once = runs[f"http, {CONCURRENCY} streams at once"]
    one_by_one = runs[f"http, {CONCURRENCY} streams one by one"]
    rows = [
        ("engine start, cold (GGUF conversion)", f"{cold:.1f} s"),
        ("engine start, cached", f"{cached:.1f} s"),
        ("`python -m backend` start to /healthz 200", f"{serve_start:.1f} s"),
        *((f"{name}", f"{run.rate:.1f} tok/s ({run.tokens} tok)") for name, run in runs.items()),
        ("HTTP / in-process, 1 stream", f"{single.rate / engine.rate:.2f}"),
        (f"{CONCURRENCY} at once / one by one", f"{at_once.rate / one_by_one.rate:.2f}x"),
        ("time to first token: browser (Enter to text shown), median", f"{ui_ttft * 1000:.0f} ms"),
        ("time to first token: backend over HTTP, median", f"{backend_ttft_s * 1000:.0f} ms"),
        ("UI overhead on time to first token", f"{(ui_ttft - backend_ttft_s) * 1000:.0f} ms"),
        ("peak RSS of the backend process tree", f"{memory.peak_bytes / 2**30:.2f} GiB"),
        ("cpu cores", str(os.cpu_count())),
    ]
    write_report(rows, runs)


if __name__ == "__main__":
    main()
