"""Reading server-sent events in tests."""

from __future__ import annotations

import json
from typing import Any


def sse_payloads(body: str) -> list[Any]:
    """The `data:` payloads of an SSE body, JSON-decoded; `[DONE]` stays a string."""
    payloads: list[Any] = []
    for line in body.splitlines():
        if line.startswith("data: "):
            data = line.removeprefix("data: ")
            payloads.append(data if data == "[DONE]" else json.loads(data))
    return payloads
