"""The chat UI in a real browser (Debian's Chromium via Playwright) against the real backend."""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Iterator

import pytest
from gradio_client import Client
from playwright.sync_api import Browser, Page, sync_playwright

from tests.e2e.services import (
    ARTIFACTS,
    BOT,
    ServiceProcess,
    free_port,
    launch_chromium,
    ui_service,
)

USER = "#chatbot [data-testid='user']"


@pytest.fixture(scope="module")
def ui(backend: ServiceProcess) -> Iterator[ServiceProcess]:
    """The UI, greedy by default so that answers are reproducible."""
    service = ui_service(free_port(), backend.url, temperature="0", max_tokens="200")
    service.start()
    yield service
    service.stop()


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with sync_playwright() as playwright:
        chromium = launch_chromium(playwright)
        yield chromium
        chromium.close()


@pytest.fixture
def page(browser: Browser, ui: ServiceProcess) -> Iterator[Page]:
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    page.goto(ui.url)
    page.locator("#status").get_by_text("SmolLM2").wait_for(timeout=60_000)
    yield page
    page.close()


def texts(page: Page, selector: str) -> list[str]:
    return page.locator(selector).all_inner_texts()


def wait_until(condition: Callable[[], bool], timeout_s: float = 90) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(0.05)


def idle(page: Page) -> bool:
    """The reply has finished: Send is usable and Stop is not."""
    return page.locator("#stop").is_disabled() and page.locator("#send").is_enabled()


def send(page: Page, text: str) -> None:
    page.locator("#msg textarea").fill(text)
    page.locator("#msg textarea").press("Enter")


def ask(page: Page, text: str) -> str:
    """Send a message, wait for the whole answer, return it."""
    bots_before = len(texts(page, BOT))
    send(page, text)
    wait_until(lambda: len(texts(page, BOT)) > bots_before and idle(page))
    return texts(page, BOT)[-1]


def test_answer_streams_into_the_chat(page: Page) -> None:
    send(page, "Write a long story about a dragon who learns to bake bread.")
    seen: list[str] = []
    wait_until(lambda: len(texts(page, BOT)) == 1)
    while not idle(page):
        current = texts(page, BOT)[-1]
        if current and (not seen or current != seen[-1]):
            seen.append(current)
        time.sleep(0.03)
    assert len(seen) >= 3, "the answer arrived in one piece, not streamed"
    assert all(later.startswith(earlier[:20]) for earlier, later in itertools.pairwise(seen))
    assert "tok/s" in page.locator("#stats").inner_text()
    page.screenshot(path=str(ARTIFACTS / "chat-ui.png"), full_page=True)


def test_second_turn_uses_the_first(page: Page) -> None:
    ask(page, "My name is Ada. Remember it.")
    answer = ask(page, "What is my name?")
    assert "Ada" in answer
    assert len(texts(page, USER)) == 2


def test_stop_ends_the_stream_and_chat_goes_on(page: Page) -> None:
    send(page, "Count from one to five hundred, in words.")
    wait_until(lambda: len(texts(page, BOT)) == 1 and len(texts(page, BOT)[-1]) > 20)
    page.locator("#stop").click()
    wait_until(lambda: idle(page), timeout_s=10)
    stopped = texts(page, BOT)[-1]
    time.sleep(1.5)
    assert texts(page, BOT)[-1] == stopped, "text kept arriving after Stop"
    assert ask(page, "What is the capital of France?").strip()


def test_regenerate_replaces_the_last_answer(page: Page) -> None:
    first = ask(page, "Tell me a fun fact about octopuses.")
    page.locator("#regenerate").click()
    seen_different = False
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        bots = texts(page, BOT)
        seen_different |= not bots or bots[-1] != first
        if seen_different and idle(page):
            break
        time.sleep(0.02)
    assert seen_different, "the answer was not generated again"
    assert len(texts(page, BOT)) == 1 and len(texts(page, USER)) == 1
    assert texts(page, BOT)[-1].strip()


def test_backend_down_shows_error_keeps_history_and_recovers(
    page: Page, backend: ServiceProcess
) -> None:
    first = ask(page, "What is the capital of France?")
    backend.stop()
    try:
        send(page, "And of Germany?")
        chat = page.locator("#chatbot")
        wait_until(lambda: idle(page) and "unreachable" in chat.inner_text().lower())
        assert texts(page, BOT)[0] == first  # history intact
        assert "And of Germany?" in texts(page, USER)
    finally:
        backend.start()
    answer = ask(page, "What is the capital of Italy?")
    assert answer.strip() and "unreachable" not in answer.lower()
    assert texts(page, BOT)[0] == first


def test_gradio_client_two_turn_chat(ui: ServiceProcess) -> None:
    client = Client(ui.url, verbose=False)
    first = client.predict("My name is Ada. Remember it.", [], api_name="/chat")
    second = client.predict("What is my name?", first["history"], api_name="/chat")
    assert "Ada" in second["reply"]
    assert [m["role"] for m in second["history"]] == ["user", "assistant", "user", "assistant"]
