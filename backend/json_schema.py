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
_MAP = (
    "properties",
    "patternProperties",
    "$defs",
    "definitions",
    "dependentSchemas",
    "dependencies",  # draft 7: a map of subschemas (or of property lists, which are skipped)
)
_LIST = ("anyOf", "oneOf", "allOf", "prefixItems", "items")
# What an object schema may say about keys it does not name: when one is there, it is obeyed.
_OPEN_KEYS = ("additionalProperties", "patternProperties", "unevaluatedProperties")


def strict(schema: Schema) -> Schema:
    """A copy of `schema` that admits only the properties and items it names. The parts of an
    intersection (`allOf`, or `$ref` beside `properties`) stay open: each holds only some of
    the object's keys, so closing one would forbid the others'."""
    closed = copy.deepcopy(schema)
    parts = _intersected(closed)
    for node in _walk(closed):
        if id(node) in parts:
            continue
        if "properties" in node and not any(key in node for key in _OPEN_KEYS):
            node["additionalProperties"] = False
        if "prefixItems" in node and "items" not in node:
            node["items"] = False
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


def _intersected(root: Schema) -> set[int]:
    """The ids of the schemas that are one part of an intersection: a schema with several
    `allOf` members, or with `allOf` or `$ref` beside its own `properties`; its members; and
    the local definitions they refer to."""
    parts: set[int] = set()
    for node in _walk(root):
        found = node.get("allOf")
        members: list[Any] = found if isinstance(found, list) else []
        beside = "properties" in node and (members or "$ref" in node)
        if len(members) < 2 and not beside:
            continue
        for part in [node, *(m for m in members if isinstance(m, dict))]:
            parts.add(id(part))
            target = _resolve(root, part.get("$ref"))
            if target is not None:
                parts.add(id(target))
    return parts


def _resolve(root: Schema, ref: Any) -> Schema | None:
    """The subschema a local reference (`#`, `#/a/b`) points at in `root`; None otherwise."""
    if not isinstance(ref, str) or not (ref == "#" or ref.startswith("#/")):
        return None
    node: Any = root
    for token in ref[2:].split("/") if ref != "#" else []:
        key = token.replace("~1", "/").replace("~0", "~")
        if isinstance(node, dict) and key in node:
            node = node[key]
        elif isinstance(node, list) and key.isdigit() and int(key) < len(node):
            node = node[int(key)]
        else:
            return None
    return node if isinstance(node, dict) else None


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
