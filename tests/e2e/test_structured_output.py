"""Structured output on the real backend: every constrained reply parses and follows its schema,
over schemas generated at random (nested objects, arrays, enums, number bounds, strings)."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import httpx
import jsonschema
import pytest

from harness.json_schemas import schemas
from harness.services import BackendProcess

pytestmark = pytest.mark.e2e

AT_ONCE = 8  # a full batch: constrained streams share decode steps


async def ask(http: httpx.AsyncClient, schema: dict[str, Any], seed: int) -> dict[str, Any]:
    body = {
        "messages": [{"role": "user", "content": "Reply with JSON for a made-up record."}],
        "response_format": {"type": "json_schema", "json_schema": {"name": "r", "schema": schema}},
        "max_tokens": 400,
        "temperature": 1.0,
        "seed": seed,
    }
    response = await http.post("/v1/chat/completions", json=body, timeout=300)
    assert response.status_code == 200, response.text
    return dict(response.json()["choices"][0])


async def ask_all(url: str, all_schemas: list[dict[str, Any]]) -> list[dict[str, Any]]:
    gate = asyncio.Semaphore(AT_ONCE)
    async with httpx.AsyncClient(base_url=url) as http:

        async def one(i: int) -> dict[str, Any]:
            async with gate:
                return await ask(http, all_schemas[i], seed=i)

        return await asyncio.gather(*(one(i) for i in range(len(all_schemas))))


def test_every_constrained_reply_parses_and_follows_its_schema(backend: BackendProcess) -> None:
    all_schemas = schemas()
    choices = asyncio.run(ask_all(backend.url, all_schemas))
    for schema, choice in zip(all_schemas, choices, strict=True):
        assert choice["finish_reason"] == "stop", choice
        jsonschema.validate(json.loads(choice["message"]["content"]), schema)


def test_json_object_mode_replies_with_an_object(backend: BackendProcess) -> None:
    body = {
        "messages": [{"role": "user", "content": "Describe a cat."}],
        "response_format": {"type": "json_object"},
        "max_tokens": 300,
        "temperature": 0,
    }
    reply = httpx.post(backend.url + "/v1/chat/completions", json=body, timeout=300).json()
    choice = reply["choices"][0]
    if choice["finish_reason"] == "stop":  # an object with no bound may run to max_tokens
        assert isinstance(json.loads(choice["message"]["content"]), dict)
    else:
        assert choice["message"]["content"].startswith("{")
