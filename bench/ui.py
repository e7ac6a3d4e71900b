"""Time to first token as a person sees it: Enter pressed in Chromium to the first text shown."""

from __future__ import annotations

import asyncio
import re
import statistics
import time
from dataclasses import dataclass

import httpx

from harness.services import BOT, ServiceProcess, free_port, launch_chromium, ui_service

UI_PROMPT = "What is the capital of France?"
UI_REPEATS = 5
# The stats line under an answer: the UI's own time from starting the reply to its first token.
_UI_TTFT = re.compile(r"⏱ ([0-9.]+) s to first token")
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


def browser_ttft(ui: ServiceProcess) -> list[tuple[float, float]]:
    """Per repeat: seconds from pressing Enter to the first token shown in Chromium, and the
    UI's own time from starting the reply to receiving that token (its stats line)."""
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
            shown = page.evaluate("(window.__first - window.__sent) / 1000")
            expect(page.locator("#stop")).to_be_disabled(timeout=120_000)  # answer done
            stats = _UI_TTFT.search(page.locator("#stats").inner_text())
            if stats is None:
                raise RuntimeError("the stats line shows no time to first token")
            times.append((shown, float(stats.group(1))))
        browser.close()
    return times[1:]


@dataclass
class UITimes:
    """Medians: time to first token in the browser and straight from the backend, and the UI's
    own share of the first (the browser's time less the UI's own wait for its backend)."""

    browser_s: float
    direct_s: float
    own_s: float


def ui_overhead(backend_url: str) -> UITimes:
    """Time to first token through the UI in a browser, and straight from the backend."""
    ui = ui_service(free_port(), backend_url, temperature="0", max_tokens="32")
    ui.start()
    try:
        direct = [asyncio.run(backend_ttft(backend_url)) for _ in range(UI_REPEATS + 1)][1:]
        through_ui = browser_ttft(ui)
    finally:
        ui.stop()
    return UITimes(
        statistics.median(shown for shown, _ in through_ui),
        statistics.median(direct),
        statistics.median(shown - backend for shown, backend in through_ui),
    )
