"""A client that leaves is an ordinary event: one log line, no traceback, nothing left running.

A plain ASGI middleware (as `backend.ingress.auth`): it sees every way a request learns that
its client left, and ends the request quietly. Without it, a disconnect surfaces as an
exception out of the app (Starlette's `ClientDisconnect` while the body is read, or whatever the
server's `receive` raises: Ray Serve's raises `TaskCancelledError` once its proxy has cancelled
the request), which Starlette's error middleware logs with its traceback and re-raises to the
server, where Ray Serve logs it again, or, if it already cancelled the request, asyncio reports
"Task exception was never retrieved".
"""

from __future__ import annotations

import asyncio
import logging
import time

from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Message, Receive, Scope, Send

# Ray Serve's logger, as its docs ask of a deployment's own lines: they reach the replica's log
# file at INFO, beside the access log line and with the same request id (the root logger of a
# Ray worker passes warnings only). Outside Ray it is a logger like any other.
logger = logging.getLogger("ray.serve")

# nginx's "client closed request": what the access log shows for a request whose client left
# before any response (the server needs one; nobody reads it).
CLIENT_CLOSED_REQUEST = 499
_DISCONNECT: Message = {"type": "http.disconnect"}


class ClientDisconnects:
    """Ends a request whose client left without an exception, and logs it in one line.

    `receive` failing counts as the client leaving (nothing more can be read from it): the app
    gets `http.disconnect` instead, so a streaming response stops as Starlette means it to. A
    `ClientDisconnect` out of the app is answered with a 499 if nothing was sent yet. A
    cancelled request (the server saw the client leave first) is logged and still cancelled.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        exchange = _Exchange(scope)

        async def receive_until_gone() -> Message:
            try:
                message = await receive()
            except Exception as exc:
                exchange.left(f"receive failed: {type(exc).__name__}")
                return _DISCONNECT
            if message["type"] == "http.disconnect":
                exchange.left("disconnected")
            return message

        async def tracked_send(message: Message) -> None:
            exchange.sent(message)
            await send(message)

        try:
            await self.app(scope, receive_until_gone, tracked_send)
        except ClientDisconnect:
            exchange.left("disconnected")
            if not exchange.started:  # the server needs a response, even for nobody
                await send({"type": "http.response.start", "status": CLIENT_CLOSED_REQUEST})
                await send({"type": "http.response.body", "body": b""})
        except asyncio.CancelledError:
            exchange.left("cancelled")
            raise
        finally:
            exchange.log()


class _Exchange:
    """What one request sent, and why its client is gone, if it is."""

    def __init__(self, scope: Scope) -> None:
        self._what = f"{scope.get('method', '')} {scope.get('path', '')}"
        self._began = time.monotonic()
        self._why: str | None = None
        self.started = False
        self._finished = False

    def sent(self, message: Message) -> None:
        if message["type"] == "http.response.start":
            self.started = True
        elif message["type"] == "http.response.body" and not message.get("more_body", False):
            self._finished = True

    def left(self, why: str) -> None:
        if self._why is None and not self._finished:  # the first sign, before the reply ended
            self._why = why

    def log(self) -> None:
        if self._why is None:
            return
        when = "mid-response" if self.started else "before a response"
        seconds = time.monotonic() - self._began
        logger.info("client left %s: %s after %.2f s (%s)", when, self._what, seconds, self._why)
