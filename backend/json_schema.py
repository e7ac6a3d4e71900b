"""JSON Schemas read as the reference servers read them, before llguidance compiles them.

- **Strict by default** (`strict`): an object schema that names its `properties` admits no other
  key unless it says so (`additionalProperties` or `patternProperties`), and a tuple
  (`prefixItems`) no item beyond those it names. This is xgrammar's strict mode, which vLLM uses
  for every JSON Schema, and OpenAI's `strict: true`. Pydantic, and so instructor and LangChain,
  write no `additionalProperties: false`; read literally, their schemas let a model add keys
  until `max_tokens`. A client that wants the literal reading says `strict: false`.
- **References travel with their schema** (`rebased`): a tool's `parameters` are embedded in the
  grammar of a call, so a local `$ref` (`#/$defs/Task`, `#`) is rewritten to point where the
  schema now lies.

Only schema positions are walked (the applicators and their kin), never data such as `const`,
`enum`, `default` or `examples`.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from typing import Any

Schema = dict[str, Any]

# Keywords whose value is one subschema, a map of subschemas, or a list of subschemas.
_ONE = (
    "additionalProperties",
    "items",
    "additionalItems",
    "contains",
    "not",
    "if",
    "then",
    "else",
    "propertyNames",
    "unevaluatedItems",
    "unevaluatedProperties",
)
_MAP = ("properties", "patternProperties", "$defs", "definitions", "dependentSchemas")
_LIST = ("anyOf", "oneOf", "allOf", "prefixItems", "items")
# What an object schema may say about keys it does not name: when one is there, it is obeyed.
_OPEN_KEYS = ("additionalProperties", "patternProperties", "unevaluatedProperties")


def strict(schema: Schema) -> Schema:
    """A copy of `schema` that admits only the properties and items it names."""
    closed = copy.deepcopy(schema)
    _close(closed)
    return closed


def rebased(schema: Schema, pointer: str) -> Schema:
    """A copy of `schema` whose local references (`#…`) resolve once it is placed at `pointer`
    (a JSON Pointer from the root of the schema that embeds it, e.g. `/properties/arguments`)."""
    moved = copy.deepcopy(schema)
    for node in _walk(moved):
        ref = node.get("$ref")
        if isinstance(ref, str) and (ref == "#" or ref.startswith("#/")):
            node["$ref"] = "#" + pointer + ref[1:]
    return moved


def _close(schema: Schema, in_intersection: bool = False) -> None:
    # A member of a multi-schema `allOf` is one part of an object: closing it would forbid the
    # other parts' keys.
    if not in_intersection:
        if "properties" in schema and not any(key in schema for key in _OPEN_KEYS):
            schema["additionalProperties"] = False
        if "prefixItems" in schema and "items" not in schema:
            schema["items"] = False
    parts = schema.get("allOf")
    intersection = isinstance(parts, list) and len(parts) > 1
    for key, child in _children(schema):
        _close(child, in_intersection=intersection and key == "allOf")


def _walk(schema: Schema) -> Iterator[Schema]:
    yield schema
    for _, child in _children(schema):
        yield from _walk(child)


def _children(schema: Schema) -> Iterator[tuple[str, Schema]]:
    """(keyword, subschema) for each subschema directly inside `schema`."""
    for key in _ONE:
        if isinstance(schema.get(key), dict):
            yield key, schema[key]
    for key in _MAP:
        if isinstance(schema.get(key), dict):
            yield from ((key, child) for child in schema[key].values() if isinstance(child, dict))
    for key in _LIST:
        if isinstance(schema.get(key), list):
            yield from ((key, child) for child in schema[key] if isinstance(child, dict))
