"""Bearer-key authentication of the HTTP API (`LLM_API_KEY`), as a plain ASGI middleware.

A plain ASGI middleware rather than Starlette's `BaseHTTPMiddleware`: it passes the request
through untouched, so streamed replies and client disconnects (which free batch slots) behave
exactly as without it.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Iterable

from starlette.datastructures import Headers
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send

from backend.errors import AuthenticationError

# Reached without a key: Kubernetes probes and load balancers carry none.
OPEN_PATHS = frozenset({"/healthz", "/health"})


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


class BearerKeyMiddleware:
    """Answers 401 to HTTP requests without `Authorization: Bearer <one of the keys>`.

    Keys are held as SHA-256 digests and the presented key's digest is compared with every one
    by `hmac.compare_digest`: equal lengths, no early exit, so the time taken tells nothing
    about how much of a key matched, nor which key. Keys are never logged or echoed.
    """

    def __init__(self, app: ASGIApp, *, keys: Iterable[str]) -> None:
        self.app = app
        self._digests = tuple(_digest(key) for key in keys)
        if not self._digests:
            raise ValueError("BearerKeyMiddleware needs at least one key")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Pass authorized requests (and non-HTTP events such as lifespan) to the app."""
        if scope["type"] != "http" or _route(scope) in OPEN_PATHS:
            await self.app(scope, receive, send)
            return
        error = self._refusal(Headers(scope=scope).get("authorization", ""))
        if error is None:
            await self.app(scope, receive, send)
            return
        response = JSONResponse(
            error.to_dict(),
            status_code=error.status_code,
            headers={"WWW-Authenticate": "Bearer"},  # RFC 6750: the scheme the client must use
        )
        await response(scope, receive, send)

    def _refusal(self, authorization: str) -> AuthenticationError | None:
        scheme, _, token = authorization.partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            return AuthenticationError(
                "Missing API key: send it as the header 'Authorization: Bearer <key>'.",
                code="invalid_api_key",
            )
        presented = _digest(token)
        matched = False
        for digest in self._digests:
            matched |= hmac.compare_digest(presented, digest)
        if matched:
            return None
        return AuthenticationError("Invalid API key.", code="invalid_api_key")


def _route(scope: Scope) -> str:
    # Ray Serve mounts an application under its route_prefix as the ASGI root_path.
    return str(scope["path"]).removeprefix(str(scope.get("root_path", ""))) or "/"
