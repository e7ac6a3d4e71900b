"""A scripted fake engine: tests enqueue replies and read back what the engine was asked."""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from backend.engines.base import Engine
from backend.errors import EngineError
from backend.generation import Delta, SamplingParams
from backend.tool_formats import NativeFormat

VOCAB = 1000


@dataclass
class Script:
    """Replies to play back (text pieces, one token each, or an exception) and the calls seen."""

    replies: deque[list[str | BaseException]] = field(default_factory=deque)
    history: list[tuple[list[dict[str, str]], SamplingParams]] = field(default_factory=list)
    context_window: int = 64
    piece_delay_s: float = 0.0
    cancelled: int = 0
    broken: str | None = None  # what `check_health` raises, as an engine whose loop died
    tool_format: NativeFormat | None = None  # the chat template's own tool-call format
    tools: list[dict[str, Any]] | None = None  # the tools last given to the chat template

    def enqueue(self, pieces: list[str | BaseException]) -> None:
        """Queue the next reply."""
        self.replies.append(pieces)


def scripted_engine(script: Script) -> type[Engine]:
    """An engine class bound to `script` (engines are built from a class by the model server)."""

    class ScriptedEngine(Engine):
        name = "scripted"

        @property
        def model_id(self) -> str:
            return "scripted-model"

        @property
        def context_window(self) -> int:
            return script.context_window

        def start(self) -> None:
            pass

        @property  # type: ignore[override]
        def tool_format(self) -> NativeFormat | None:
            return script.tool_format

        vocab_size = VOCAB

        def encode_chat(
            self, messages: list[dict[str, str]], tools: list[dict[str, Any]] | None = None
        ) -> list[int]:
            self._messages = messages
            script.tools = tools
            return [len(word) for m in messages for word in m["content"].split()] or [0]

        def encode_text(self, text: str) -> list[int]:
            self._messages = [{"role": "prompt", "content": text}]
            return [len(word) for word in text.split()] or [0]

        def decode(self, token_ids: list[int]) -> str:
            if any(n >= VOCAB for n in token_ids):  # as a real tokenizer's vocabulary ends
                raise IndexError("token id out of range")
            return " ".join("x" * n for n in token_ids)

        async def generate(
            self, prompt_ids: list[int], params: SamplingParams
        ) -> AsyncIterator[Delta]:
            """Each of the `n` choices plays the next queued reply; their deltas interleave."""
            script.history.append((self._messages, params))
            replies = [
                (script.replies.popleft() if script.replies else ["ok"])[: params.max_tokens + 1]
                for _ in range(params.n)
            ]
            try:
                for step in range(max(len(pieces) for pieces in replies)):
                    for index, pieces in enumerate(replies):
                        if step < min(len(pieces), params.max_tokens):
                            await asyncio.sleep(script.piece_delay_s)
                            yield _scripted_delta(pieces, step, params.max_tokens, index)
            except (GeneratorExit, asyncio.CancelledError):  # closed, or its task cancelled
                script.cancelled += 1
                raise

        def check_health(self) -> None:
            if script.broken:
                raise EngineError(script.broken)

        def shutdown(self) -> None:
            pass

    return ScriptedEngine


def _scripted_delta(
    pieces: list[str | BaseException], step: int, max_tokens: int, index: int
) -> Delta:
    """The delta of `pieces[step]` (raised if it is an exception), finishing at the last piece."""
    piece = pieces[step]
    if isinstance(piece, BaseException):
        raise piece
    last = step + 1 == min(len(pieces), max_tokens)
    reason = None if not last else "stop" if len(pieces) <= max_tokens else "length"
    return Delta(text=piece, tokens=1, finish_reason=reason, index=index)
