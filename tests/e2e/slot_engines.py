"""Checks both Neuron stand-in e2e modules run: engines with one cache slot per sequence."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx

CHAT = "/v1/chat/completions"


async def check_batching_changes_no_token(url: str) -> None:
    """Six greedy requests at once (two questions) say what one alone says: each slot is
    computed from its own cache row only."""

    async def one(http: httpx.AsyncClient, i: int) -> dict[str, Any]:
        body = {
            "messages": [{"role": "user", "content": f"Question {i}"}],
            "max_tokens": 16,
            "temperature": 0,
            "ignore_eos": True,
        }
        return dict((await http.post(url + CHAT, json=body, timeout=120)).json())

    async with httpx.AsyncClient() as http:
        alone = await one(http, 0)
        together = await asyncio.gather(*(one(http, i % 2) for i in range(6)))
    assert [r["usage"]["completion_tokens"] for r in together] == [16] * 6
    texts = {r["choices"][0]["message"]["content"] for i, r in enumerate(together) if i % 2 == 0}
    assert texts == {alone["choices"][0]["message"]["content"]}
