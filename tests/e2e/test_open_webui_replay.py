"""Open WebUI 0.12.4's default chat flow, replayed request by request against the real backend.

The requests are the ones a real Open WebUI sent (tests/fixtures/openwebui, whose README says
how they were recorded): the chat with its 36 built-in tools and no `tool_choice`, then the
title, tags and follow-up tasks, a second turn, and the turn after a tool ran. Each is sent as
recorded, but for `model`, which Open WebUI takes from `GET /v1/models`. `make compat` runs
Open WebUI itself; this test keeps its requests in the suite.
"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest

from harness.services import ServiceProcess
from tests.sse import sse_payloads

pytestmark = pytest.mark.e2e

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "openwebui"
CHATS = ["chat", "chat_second_turn", "chat_tool_result"]
TASKS = ["title", "tags", "follow_ups"]


def recorded(kind: str) -> dict[str, Any]:
    return dict(json.loads((FIXTURES / f"{kind}.json").read_text()))


def send(backend: ServiceProcess, kind: str, model: str) -> httpx.Response:
    request = recorded(kind)
    body = {**request["body"], "model": model}
    return httpx.request(request["method"], backend.url + request["path"], json=body, timeout=600)


def test_open_webuis_default_flow_gets_replies(backend: ServiceProcess) -> None:
    for kind in CHATS:  # what the replay stands for: tools on every chat, no tool_choice
        body = recorded(kind)["body"]
        assert body["stream"] is True and len(body["tools"]) == 36 and "tool_choice" not in body
    models = httpx.get(backend.url + recorded("models")["path"], timeout=30)
    assert models.status_code == 200
    model = models.json()["data"][0]["id"]
    # As Open WebUI does: the title task runs beside the first reply; then tags and follow-ups.
    with ThreadPoolExecutor(max_workers=3) as pool:
        first = pool.submit(send, backend, "chat", model)
        title = pool.submit(send, backend, "title", model)
        chats = [check_streamed_reply(first.result())]
        tasks = [title, *(pool.submit(send, backend, kind, model) for kind in TASKS[1:])]
        answered = [check_reply(task.result()) for task in tasks]
    chats += [check_streamed_reply(send(backend, kind, model)) for kind in CHATS[1:]]
    # A sampled tiny model may end a reply at once (an empty answer is a well-formed one); the
    # flow as a whole shows that text reaches Open WebUI on both paths.
    assert any(chats) and any(answered), (chats, answered)


def check_streamed_reply(response: httpx.Response) -> bool:
    """A 200 stream with no error event, ending once (calls that parse when it ends in calls),
    then `[DONE]`; whether it carried text or calls."""
    assert response.status_code == 200, response.text
    events = sse_payloads(response.text)
    assert events[-1] == "[DONE]" and not any("error" in event for event in events[:-1])
    choices = [event["choices"][0] for event in events[:-1] if event["choices"]]
    finishes = [choice["finish_reason"] for choice in choices if choice["finish_reason"]]
    assert len(finishes) == 1 and finishes[0] in ("stop", "tool_calls", "length")
    text = "".join(choice["delta"].get("content") or "" for choice in choices)
    calls = [call for choice in choices for call in choice["delta"].get("tool_calls") or []]
    if finishes[0] == "tool_calls":
        arguments = [json.loads(call["function"]["arguments"]) for call in calls]
        assert arguments and all(isinstance(each, dict) for each in arguments)
    else:
        assert not calls
    return bool(text or calls)


def check_reply(response: httpx.Response) -> bool:
    """A 200 completion whose choice ended as a reply does; whether it has text."""
    assert response.status_code == 200, response.text
    choice = response.json()["choices"][0]
    assert choice["finish_reason"] in ("stop", "length")
    assert isinstance(choice["message"]["content"], str) and "tool_calls" not in choice["message"]
    return bool(choice["message"]["content"])
