"""Clients that leave, at the ASGI level: the app ends the request quietly, logs it in one line,
and closes the generation at once (over the real model server with a scripted engine).

httpx's ASGI transport cannot leave mid-request, so these tests are the server: they call the app
with a `receive` that tells it the client left, as uvicorn or Ray Serve's proxy would.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Awaitable, Callable

import pytest
from fastapi import FastAPI
from starlette.types import Message

from backend.ingress.routes import build_api
from backend.replica.model_server import ModelServer
from backend.settings import BackendSettings
from tests.fakes import Script

CHAT = "/v1/chat/completions"
HELLO = [{"role": "user", "content": "hello there"}]
# What Ray Serve's `receive` raises once its proxy cancelled the request (a `ray` exception).
LEFT = RuntimeError("Task: 1f2e was cancelled.")


@pytest.fixture
def app(server: ModelServer, settings: BackendSettings) -> FastAPI:
    return build_api(server, settings)


def scope(body: bytes, path: str = CHAT) -> dict[str, object]:
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    return {
        "type": "http",
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "root_path": "",
        "query_string": b"",
        "headers": headers,
        "client": ("127.0.0.1", 50000),
        "server": ("backend", 80),
    }


class Client:
    """One client of the app: sends `body` (only its first half if `halfway`), then leaves as
    the `leave` given to `receive` says."""

    def __init__(self, body: dict[str, object], halfway: bool = False) -> None:
        self.raw = json.dumps(body).encode()
        self._halfway = halfway
        self.sent: list[Message] = []
        self.first_token = asyncio.Event()

    def receive(self, leave: Callable[[], Awaitable[Message]]) -> Callable[[], Awaitable[Message]]:
        """The body (or its first half), then what `leave` returns."""
        body = self.raw[: len(self.raw) // 2] if self._halfway else self.raw
        parts = [{"type": "http.request", "body": body, "more_body": self._halfway}]

        async def receive() -> Message:
            return parts.pop() if parts else await leave()

        return receive

    async def send(self, message: Message) -> None:
        self.sent.append(message)
        if message["type"] == "http.response.body" and b"tok" in message.get("body", b""):
            self.first_token.set()  # the engine is generating (a chat stream's role came first)
        await asyncio.sleep(0)  # a server's send gives way (uvicorn's waits for the socket)

    @property
    def status(self) -> int | None:
        starts = [m["status"] for m in self.sent if m["type"] == "http.response.start"]
        return starts[0] if starts else None

    @property
    def text(self) -> str:
        return b"".join(m.get("body", b"") for m in self.sent if "body" in m).decode()


def disconnect_after(event: asyncio.Event) -> Callable[[], Awaitable[Message]]:
    async def leave() -> Message:
        await event.wait()
        return {"type": "http.disconnect"}

    return leave


def raise_after(event: asyncio.Event) -> Callable[[], Awaitable[Message]]:
    async def leave() -> Message:
        await event.wait()
        raise LEFT

    return leave


def lines(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    """What the app logged (anything but the test's own loggers)."""
    return [r for r in caplog.records if r.name.startswith(("backend", "ray", "asyncio"))]


def assert_one_quiet_line(caplog: pytest.LogCaptureFixture) -> str:
    [line] = lines(caplog)
    assert line.levelno == logging.INFO and line.exc_info is None, line
    assert "Traceback" not in caplog.text
    return line.getMessage()


@pytest.mark.parametrize("leave", [disconnect_after, raise_after], ids=["disconnect", "raise"])
async def test_a_client_that_leaves_while_sending_its_body_gets_one_line_and_nothing_runs(
    app: FastAPI,
    script: Script,
    caplog: pytest.LogCaptureFixture,
    leave: Callable[[asyncio.Event], Callable[[], Awaitable[Message]]],
) -> None:
    caplog.set_level(logging.INFO)
    client = Client({"messages": HELLO}, halfway=True)
    gone = asyncio.Event()
    gone.set()
    await app(scope(client.raw), client.receive(leave(gone)), client.send)  # raises nothing
    assert client.status == 499  # a response for the access log; nobody reads it
    assert script.history == []  # nothing was generated
    message = assert_one_quiet_line(caplog)
    assert "client left before a response: POST /v1/chat/completions" in message


@pytest.mark.parametrize("leave", [disconnect_after, raise_after], ids=["disconnect", "raise"])
@pytest.mark.parametrize("path", [CHAT, "/v1/completions"])
async def test_a_client_that_leaves_mid_stream_stops_its_generation_at_once(
    app: FastAPI,
    script: Script,
    caplog: pytest.LogCaptureFixture,
    leave: Callable[[asyncio.Event], Callable[[], Awaitable[Message]]],
    path: str,
) -> None:
    caplog.set_level(logging.INFO)
    script.piece_delay_s = 0.01
    script.enqueue(["tok"] * 30)
    request: dict[str, object] = {"stream": True, "max_tokens": 30}
    request.update({"messages": HELLO} if path == CHAT else {"prompt": "Once upon"})
    client = Client(request)
    await app(scope(client.raw, path), client.receive(leave(client.first_token)), client.send)
    # Closed before the app returned: not left to garbage collection.
    assert script.cancelled == 1
    assert client.status == 200 and "[DONE]" not in client.text
    message = assert_one_quiet_line(caplog)
    assert f"client left mid-response: POST {path}" in message


async def test_a_request_the_server_cancels_is_still_cancelled_and_logged_once(
    app: FastAPI, script: Script, caplog: pytest.LogCaptureFixture
) -> None:
    """Ray Serve cancels the request's task when its proxy sees the client leave first."""
    caplog.set_level(logging.INFO)
    script.piece_delay_s = 0.01
    script.enqueue(["tok"] * 30)
    client = Client({"messages": HELLO, "stream": True, "max_tokens": 30})
    never = asyncio.Event()
    task = asyncio.create_task(
        app(scope(client.raw), client.receive(disconnect_after(never)), client.send)
    )
    await client.first_token.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert script.cancelled == 1
    message = assert_one_quiet_line(caplog)
    assert "client left mid-response" in message and "cancelled" in message


async def test_a_client_that_stays_gets_its_whole_stream_and_no_line(
    app: FastAPI, script: Script, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    script.enqueue(["a", "b"])
    client = Client({"messages": HELLO, "stream": True})
    never = asyncio.Event()
    await app(scope(client.raw), client.receive(disconnect_after(never)), client.send)
    assert client.status == 200 and client.text.rstrip().endswith("data: [DONE]")
    assert script.cancelled == 0 and lines(caplog) == []
