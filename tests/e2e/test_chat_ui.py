"""The chat UI in a real browser (Debian's Chromium via Playwright) against the real backend."""

from __future__ import annotations

import itertools
import json
import time
from collections.abc import Iterator

import jsonschema
import pytest
from gradio_client import Client
from playwright.sync_api import Browser, Page, sync_playwright

from harness.services import (
    ARTIFACTS,
    BOT,
    BackendProcess,
    ServiceProcess,
    free_port,
    kill_model_replica,
    launch_chromium,
    ui_service,
    wait_until,
)
from tests.e2e.tap import Tap

pytestmark = pytest.mark.e2e

USER = "#chatbot [data-testid='user']"
RUNNING = "ray_vllm_num_requests_running"
# Every reply runs to the UI's max_tokens, so no test depends on where a tiny model stops.
REPLY_TOKENS = 40
# Two functions, so that naming one in the tool choice decides which is called. Strings are
# bounded: up to 8 calls of either always fit TOOL_TOKENS, so a call is never cut short.
WEATHER = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 30},
        "unit": {"enum": ["celsius", "fahrenheit"]},
    },
    "required": ["city", "unit"],
    "additionalProperties": False,
}
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Weather in a city",
            "parameters": WEATHER,
        },
    },
    {
        "type": "function",
        "function": {
            "name": "get_time",
            "description": "Time in a time zone",
            "parameters": {"type": "object", "properties": {"zone": {"enum": ["UTC", "CET"]}}},
        },
    },
]
TOOL_TOKENS = 800


@pytest.fixture(scope="module")
def tap(backend: ServiceProcess) -> Iterator[Tap]:
    """The UI reaches the backend through a recording proxy."""
    proxy = Tap(backend.url, free_port(), extra_body={"ignore_eos": True})
    proxy.start()
    yield proxy
    proxy.stop()


@pytest.fixture(scope="module")
def ui(tap: Tap) -> Iterator[ServiceProcess]:
    # Health every second: a replaced model replica is away for seconds, and the status says so.
    service = ui_service(
        free_port(),
        tap.url,
        temperature="0",
        max_tokens=str(REPLY_TOKENS),
        health_poll_interval_s="1",
    )
    service.start()
    yield service
    service.kill()


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with sync_playwright() as playwright:
        chromium = launch_chromium(playwright)
        yield chromium
        chromium.close()


@pytest.fixture
def page(browser: Browser, ui: ServiceProcess) -> Iterator[Page]:
    page = browser.new_page(viewport={"width": 1280, "height": 900}, locale="en-US")
    page.goto(ui.url)
    page.locator("#status").get_by_text("SmolLM2").wait_for(timeout=60_000)
    yield page
    page.close()


def texts(page: Page, selector: str) -> list[str]:
    return page.locator(selector).all_inner_texts()


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


def test_answer_streams_into_the_chat(page: Page, tap: Tap) -> None:
    # Long enough to watch it grow on a fast engine (llama.cpp writes 40 tokens in ~0.3 s).
    tap.extra_body["max_tokens"] = 400
    try:
        send(page, "Write a long story about a dragon who learns to bake bread.")
        seen: list[str] = []
        wait_until(lambda: len(texts(page, BOT)) == 1)
        while not idle(page):
            current = texts(page, BOT)[-1]
            if current and (not seen or current != seen[-1]):
                seen.append(current)
            time.sleep(0.03)
    finally:
        del tap.extra_body["max_tokens"]
    assert len(seen) >= 3, "the answer arrived in one piece, not streamed"
    assert all(later.startswith(earlier[:20]) for earlier, later in itertools.pairwise(seen))
    assert "tok/s" in page.locator("#stats").inner_text()
    page.screenshot(path=str(ARTIFACTS / "chat-ui.png"), full_page=True)


def test_enter_shows_the_message_and_locks_the_input_until_the_answer(page: Page, tap: Tap) -> None:
    box = page.locator("#msg textarea")
    exchanges = len(tap.exchanges)
    send(page, "   ")
    time.sleep(0.5)
    assert texts(page, USER) == [] and len(tap.exchanges) == exchanges and box.is_enabled()
    tap.extra_body["max_tokens"] = 200  # a reply long enough to look at the locked input
    try:
        send(page, "Tell me about bread.")
        wait_until(lambda: texts(page, USER) == ["Tell me about bread."])
        assert box.input_value() == "" and box.is_disabled()
        assert page.locator("#send").is_disabled() and page.locator("#stop").is_enabled()
        wait_until(lambda: idle(page))
    finally:
        del tap.extra_body["max_tokens"]
    assert box.is_enabled() and len(tap.exchanges) == exchanges + 1
    assert tap.last().messages == [{"role": "user", "content": "Tell me about bread."}]


def test_second_turn_sends_the_whole_conversation(page: Page, tap: Tap) -> None:
    ask(page, "My name is Ada. Remember it.")
    first = tap.last()
    ask(page, "What is my name?")
    assert tap.last().messages == [
        {"role": "user", "content": "My name is Ada. Remember it."},
        {"role": "assistant", "content": first.reply.strip()},
        {"role": "user", "content": "What is my name?"},
    ]
    assert first.reply.strip() and len(texts(page, USER)) == 2


def test_stop_closes_the_backend_stream_and_chat_goes_on(
    page: Page, tap: Tap, backend: BackendProcess
) -> None:
    tap.extra_body["max_tokens"] = 1500  # minutes of text if Stop did nothing
    try:
        send(page, "Count from one to five hundred, in words.")
        wait_until(lambda: len(texts(page, BOT)) == 1 and len(texts(page, BOT)[-1]) > 20)
        wait_until(lambda: backend.metric(RUNNING) == 1, 30, "the reply is in the batch")
        page.locator("#stop").click()
        wait_until(lambda: idle(page), timeout_s=10)
    finally:
        del tap.extra_body["max_tokens"]
    stopped, exchange = texts(page, BOT)[-1], tap.last()
    wait_until(lambda: exchange.closed, 10, "the UI closed its HTTP stream")
    assert not exchange.completed, "the reply ran to its end: Stop did not stop it"
    wait_until(lambda: backend.metric(RUNNING) == 0, 30, "the backend freed the batch slot")
    assert texts(page, BOT)[-1] == stopped, "text kept arriving after Stop"
    ask(page, "What is the capital of France?")
    assert tap.last().completed and len(texts(page, BOT)) == 2


def test_regenerate_asks_the_same_question_again(page: Page, tap: Tap) -> None:
    ask(page, "Tell me a fun fact about octopuses.")
    asked = len(tap.exchanges)
    page.locator("#regenerate").click()
    wait_until(lambda: len(tap.exchanges) > asked and tap.last().closed and idle(page))
    # The old answer is not sent back as history: the same question, alone, is asked again.
    assert tap.exchanges[asked].messages == tap.exchanges[asked - 1].messages
    assert len(texts(page, BOT)) == 1 and len(texts(page, USER)) == 1


def test_json_output_shows_a_code_block_and_sends_the_reply_back_as_it_came(
    page: Page, tap: Tap
) -> None:
    page.locator("#settings").get_by_text("Settings").click()
    toggle = page.locator("#json-output input[type='checkbox']")
    toggle.check()
    # The backend refuses ignore_eos with a JSON response_format: the object ends by itself.
    del tap.extra_body["ignore_eos"]
    tap.extra_body["max_tokens"] = 300
    try:
        ask(page, "What is the capital of France? Answer as JSON with the key capital.")
    finally:
        del tap.extra_body["max_tokens"]
        tap.extra_body["ignore_eos"] = True
    asked = tap.last()
    assert asked.body.get("response_format") == {"type": "json_object"}
    assert asked.completed and isinstance(json.loads(asked.reply), dict)
    code = page.locator(BOT).last.locator("pre code")
    assert json.loads(code.inner_text()) == json.loads(asked.reply)
    toggle.uncheck()
    ask(page, "Thank you.")
    assert "response_format" not in tap.last().body  # a plain chat again
    assert tap.last().messages[1] == {"role": "assistant", "content": asked.reply.strip()}


def test_a_tool_call_shows_readably_and_the_next_message_is_its_result(
    page: Page, tap: Tap
) -> None:
    page.locator("#settings").get_by_text("Settings").click()
    page.locator("#tools textarea").fill(json.dumps(TOOLS))
    choose_tool(page, "get_weather")
    # The backend refuses ignore_eos with tool calls: the calls end by themselves.
    del tap.extra_body["ignore_eos"]
    tap.extra_body["max_tokens"] = TOOL_TOKENS
    try:
        ask(page, "What is the weather in Paris?")
        called = tap.last()
        bots = len(texts(page, BOT))
        ask(page, "18 degrees and sunny.")  # the result of the call
        answered = tap.last()
    finally:
        del tap.extra_body["max_tokens"]
        tap.extra_body["ignore_eos"] = True
    assert called.body["tools"] == TOOLS
    assert called.body["tool_choice"] == {"type": "function", "function": {"name": "get_weather"}}
    assert called.completed and called.tool_calls, "the backend sent no tool call"
    # Shown readably: each call's function and its arguments as a JSON block, not the wire format.
    shown = page.locator(BOT).nth(bots - 1)
    blocks = shown.locator("pre code").all_inner_texts()
    assert len(blocks) == len(called.tool_calls)
    for block, call in zip(blocks, called.tool_calls, strict=True):
        assert call["function"]["name"] == "get_weather"
        arguments = json.loads(block)
        jsonschema.validate(arguments, WEATHER)
        assert arguments == json.loads(call["function"]["arguments"])
    headings = shown.inner_text().count("Tool call get_weather")
    assert headings == len(blocks) and called.tool_calls[0]["id"] not in shown.inner_text()
    # The call goes back as it came, and the message after it as its result, call by call.
    calls = [{k: v for k, v in call.items() if k != "index"} for call in called.tool_calls]
    results = [
        {"role": "tool", "tool_call_id": call["id"], "content": "18 degrees and sunny."}
        for call in calls
    ]
    assert answered.messages == [
        *called.messages,
        {"role": "assistant", "content": None, "tool_calls": calls},
        *results,
    ]
    assert answered.completed and answered.tool_calls and len(texts(page, BOT)) == bots + 1
    page.screenshot(path=str(ARTIFACTS / "chat-ui-tools.png"), full_page=True)
    # With Tools emptied, the chat goes on as a plain one over the same history.
    page.locator("#tools textarea").fill("")
    wait_until(lambda: page.locator("#tool-choice input").input_value() == "auto")
    ask(page, "Thank you.")
    plain = tap.last()
    assert "tools" not in plain.body and "tool_choice" not in plain.body
    assert plain.completed and plain.reply and not plain.tool_calls
    assert len(texts(page, BOT)) == bots + 2


def choose_tool(page: Page, name: str) -> None:
    """Pick `name` in the tool choice once the Tools box has offered it."""
    box = page.locator("#tool-choice input")
    option = page.locator(f"#tool-choice [data-testid='dropdown-option'][aria-label='{name}']")

    def offered() -> bool:
        box.click()
        return option.is_visible()

    wait_until(offered, timeout_s=10, what=f"{name} among the tool choices")
    option.click()
    wait_until(lambda: box.input_value() == name, timeout_s=10)


def test_backend_down_shows_error_keeps_history_and_recovers(page: Page, tap: Tap) -> None:
    first = ask(page, "What is the capital of France?")
    # The UI's backend address refuses connections, as a stopped backend's does (the UI knows
    # the backend by that address alone; the backend itself keeps running for other tests).
    tap.stop()
    try:
        send(page, "And of Germany?")
        chat = page.locator("#chatbot")
        wait_until(lambda: idle(page) and "unreachable" in chat.inner_text().lower())
        assert texts(page, BOT)[0] == first  # history intact
        assert "And of Germany?" in texts(page, USER)
    finally:
        tap.start()
    answer = ask(page, "What is the capital of Italy?")
    assert "unreachable" not in answer.lower() and tap.last().completed
    assert texts(page, BOT)[0] == first


def test_a_killed_model_replica_shows_until_a_new_one_serves(
    page: Page, backend: BackendProcess, tap: Tap
) -> None:
    ask(page, "What is the capital of France?")  # the ingress has seen the model serve
    kill_model_replica(backend)
    status = page.locator("#status")
    wait_until(lambda: backend.health() != 200, timeout_s=60, what="/healthz leaves 200")
    status.get_by_text("Backend not ready").wait_for(timeout=60_000)
    wait_until(lambda: backend.health() == 200, timeout_s=240, what="a new replica serves")
    status.get_by_text("Backend ready").wait_for(timeout=60_000)
    answer = ask(page, "What is the capital of Italy?")
    assert "unreachable" not in answer.lower() and tap.last().completed


def test_gradio_client_two_turn_chat(ui: ServiceProcess, tap: Tap) -> None:
    client = Client(ui.url, verbose=False)
    first = client.predict("My name is Ada. Remember it.", [], api_name="/chat")
    second = client.predict("What is my name?", first["history"], api_name="/chat")
    assert [m["role"] for m in second["history"]] == ["user", "assistant", "user", "assistant"]
    assert tap.last().messages == [
        {"role": "user", "content": "My name is Ada. Remember it."},
        {"role": "assistant", "content": first["reply"].strip()},
        {"role": "user", "content": "What is my name?"},
    ]
    assert second["reply"] == tap.last().reply
