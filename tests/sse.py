"""Reading server-sent events in tests."""

from __future__ import annotations

import json
from typing import Any

from backend.settings import BackendSettings


def sse_payloads(body: str) -> list[Any]:
    """The `data:` payloads of an SSE body, JSON-decoded; `[DONE]` stays a string."""
    payloads: list[Any] = []
    for line in body.splitlines():
        if line.startswith("data: "):
            data = line.removeprefix("data: ")
            payloads.append(data if data == "[DONE]" else json.loads(data))
    return payloads


def stream_interval_s() -> float:
    """The backend's default stream interval: it posts a stream's text at most this often."""
    return BackendSettings().stream_interval_ms / 1000


def fewest_chunks(seconds: float, tokens: int) -> float:
    """The fewest content chunks a stream of `tokens` tokens lasting `seconds` may send.

    The backend sends a chunk per stream interval (per token, if tokens come slower, or if the
    interval is 0), so the count follows the machine's speed; a third of it leaves room for a
    busy machine.
    """
    interval_s = stream_interval_s()
    intervals = seconds / interval_s if interval_s else tokens
    return min(tokens, intervals) / 3
