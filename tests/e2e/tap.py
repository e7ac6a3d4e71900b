"""A recording proxy between the chat UI and the real backend: what the UI sent, what came back.

UI tests assert the mechanism through it (the UI sent the whole conversation; Stop closed the
HTTP stream before the reply was complete) instead of what a tiny model happens to say. It can
also add fields to every chat request (`ignore_eos`, so replies have a known length).
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import uvicorn
from starlette.requests import Request
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from chatui.clients import SSEDecoder

CHAT_PATH = "/v1/chat/completions"
# Framing headers belong to each hop; the proxy recomputes them.
_HOP_HEADERS = {"host", "content-length", "transfer-encoding", "connection"}


@dataclass
class Exchange:
    """One chat request the UI made, and what the backend streamed back through the tap."""

    body: dict[str, Any]
    reply: str = ""
    tool_calls: list[dict[str, Any]] = field(default_factory=list)  # as the deltas had them
    completed: bool = False  # the backend sent `data: [DONE]`: the reply was complete
    closed: bool = False  # the exchange is over (finished, or the UI hung up)

    @property
    def messages(self) -> list[dict[str, Any]]:
        """The conversation the UI sent."""
        return list(self.body["messages"])


@dataclass
class Tap:
    """The proxy; `start()` serves it on `port` in a thread, forwarding to `upstream`."""

    upstream: str
    port: int
    extra_body: dict[str, Any] = field(default_factory=dict)
    exchanges: list[Exchange] = field(default_factory=list)
    _server: uvicorn.Server | None = None
    _thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        """The address to give the UI as its backend."""
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        """Serve in a background thread until `stop()`."""
        config = uvicorn.Config(
            self._app, host="127.0.0.1", port=self.port, log_level="warning", interface="asgi3"
        )
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, name="tap", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + 10
        while not self._server.started:
            if time.monotonic() > deadline or not self._thread.is_alive():
                raise RuntimeError("the tap did not start")
            time.sleep(0.02)

    def stop(self) -> None:
        """Stop serving (the UI then finds its backend address unreachable)."""
        if self._server is not None and self._thread is not None:
            self._server.should_exit = True
            self._thread.join(timeout=10)

    def last(self) -> Exchange:
        """The most recent chat exchange."""
        return self.exchanges[-1]

    async def _app(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        request = Request(scope, receive)
        body = await request.body()
        exchange = None
        if scope["path"] == CHAT_PATH and request.method == "POST":
            exchange = Exchange({**json.loads(body), **self.extra_body})
            self.exchanges.append(exchange)
            body = json.dumps(exchange.body).encode()
        client = httpx.AsyncClient(timeout=httpx.Timeout(120, connect=5))
        upstream = client.build_request(
            request.method,
            self.upstream + scope["path"],
            params=request.query_params.multi_items(),
            headers=_end_to_end(request.headers.items()),
            content=body,
        )
        reply = await client.send(upstream, stream=True)
        response = StreamingResponse(
            _relay(reply, client, exchange),
            status_code=reply.status_code,
            headers=_end_to_end(reply.headers.items()),
        )
        await response(scope, receive, send)


async def _relay(
    reply: httpx.Response, client: httpx.AsyncClient, exchange: Exchange | None
) -> AsyncIterator[bytes]:
    """Pass the backend's bytes on; closing (the UI hung up) closes the backend's stream too."""
    decoder = SSEDecoder()
    try:
        async for chunk in reply.aiter_raw():
            if exchange is not None:
                _record(exchange, decoder.feed(chunk))
            yield chunk
    finally:
        await reply.aclose()
        await client.aclose()
        if exchange is not None:
            exchange.closed = True


def _record(exchange: Exchange, payloads: list[str]) -> None:
    for payload in payloads:
        if payload == "[DONE]":
            exchange.completed = True
            continue
        data = json.loads(payload)
        for choice in data.get("choices") or []:
            exchange.reply += choice.get("delta", {}).get("content") or ""
            exchange.tool_calls += choice.get("delta", {}).get("tool_calls") or []
        if "error" in data:
            exchange.reply += f"[error: {data['error']['message']}]"


def _end_to_end(headers: Any) -> dict[str, str]:
    return {k: v for k, v in headers if k.lower() not in _HOP_HEADERS}
