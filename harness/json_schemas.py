"""JSON schemas generated at random (nested objects, arrays, enums, number bounds, strings), every
one bounded so that a reply under it has an end: the structured-output e2e test asks the backend
for each, and `python -m bench grammars` compiles and decodes each with both grammar libraries."""

from __future__ import annotations

import random
from typing import Any

SCHEMAS = 50
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
    """The same `SCHEMAS` schemas on every run."""
    rng = random.Random(21)
    return [obj(rng, 0, rng.randint(1, 4)) for _ in range(SCHEMAS)]
