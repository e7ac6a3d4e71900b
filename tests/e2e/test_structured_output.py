"""Structured output on the real backend: every constrained reply parses and follows its schema,
over schemas generated at random (nested objects, arrays, enums, number bounds, strings)."""

from __future__ import annotations

import asyncio
import json
import random
from typing import Any

import httpx
import jsonschema
import pytest

from tests.e2e.services import BackendProcess

pytestmark = pytest.mark.e2e

SCHEMAS = 50
AT_ONCE = 8  # a full batch: constrained streams share decode steps
WORDS = ["alpha", "beta", "gamma", "delta", "omega", "red", "green", "blue"]


def leaf(rng: random.Random) -> dict[str, Any]:
    """A bounded scalar: every reply under it has an end."""
    kind = rng.choice(["string", "integer", "boolean", "enum"])
    if kind == "string":
        return {"type": "string", "maxLength": rng.randint(1, 12)}
    if kind == "integer":
        low = rng.randint(-50, 50)
        return {"type": "integer", "minimum": low, "maximum": low + rng.randint(0, 1000)}
    if kind == "enum":
        return {"enum": rng.sample(WORDS, rng.randint(1, 4))}
    return {"type": "boolean"}


def value(rng: random.Random, depth: int) -> dict[str, Any]:
    roll = rng.random()
    if depth < 2 and roll < 0.25:
        return obj(rng, depth + 1, rng.randint(1, 3))
    if roll < 0.45:
        return {"type": "array", "items": leaf(rng), "minItems": 1, "maxItems": rng.randint(1, 3)}
    return leaf(rng)


def obj(rng: random.Random, depth: int, size: int) -> dict[str, Any]:
    names = rng.sample(["id", "name", "kind", "score", "tags", "owner", "ok", "note"], size)
    return {
        "type": "object",
        "properties": {name: value(rng, depth) for name in names},
        "required": names,
        "additionalProperties": False,
    }


def schemas() -> list[dict[str, Any]]:
    rng = random.Random(21)
    return [obj(rng, 0, rng.randint(1, 4)) for _ in range(SCHEMAS)]


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
