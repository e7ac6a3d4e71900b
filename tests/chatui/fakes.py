"""A scripted backend client: tests enqueue replies and read back what the UI sent."""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import AsyncIterator
from typing import Any

import httpx

from chatui.clients import (
    BackendStatus,
    ChatClient,
    ChatOptions,
    Finished,
    Messages,
    StreamEvent,
    TextDelta,
    Usage,
)

Step = StreamEvent | BaseException


class ScriptedClient(ChatClient):
    """Plays back queued replies (events, or an exception to raise) and records every call."""

    def __init__(self, status: BackendStatus | None = None) -> None:
        super().__init__("http://scripted.test", timeout=httpx.Timeout(1.0))
        self.status = status or BackendStatus("ready", "scripted-model", 4096)
        self.replies: deque[list[Step]] = deque()
        self.calls: list[tuple[list[dict[str, Any]], ChatOptions]] = []
        self.closed = 0
        self.step_delay_s = 0.0

    def enqueue(self, *steps: Step) -> None:
        """Queue the next reply."""
        self.replies.append(list(steps))

    def enqueue_text(self, *pieces: str, completion_tokens: int | None = None) -> None:
        """Queue a complete reply made of `pieces`."""
        tokens = len(pieces) if completion_tokens is None else completion_tokens
        usage = Usage(prompt_tokens=10, completion_tokens=tokens, total_tokens=10 + tokens)
        self.enqueue(*(TextDelta(p) for p in pieces), Finished("stop", usage))

    async def stream_chat(
        self, messages: Messages, options: ChatOptions
    ) -> AsyncIterator[StreamEvent]:
        """The next queued reply (default: "ok")."""
        self.calls.append(([dict(m) for m in messages], options))
        steps = self.replies.popleft() if self.replies else [TextDelta("ok"), Finished("stop")]
        try:
            for step in steps:
                await asyncio.sleep(self.step_delay_s)
                if isinstance(step, BaseException):
                    raise step
                yield step
        finally:
            self.closed += 1

    async def health(self) -> BackendStatus:
        """The status set by the test."""
        return self.status
