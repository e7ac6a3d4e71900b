"""The OpenAPI document as the contract: routes that read their body raw (to enforce the size
limit while reading) still publish the request and response schemas they validate against.

The schemas are pydantic's own (validation mode for requests, serialization mode for responses),
so `/docs`, SDK generators and fuzzers see exactly what the routes accept and return.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

_REF = "#/components/schemas/{model}"


def json_body(model: type[BaseModel]) -> dict[str, Any]:
    """`openapi_extra` of a route whose JSON body is `model`."""
    return {
        "requestBody": {
            "required": True,
            "content": {
                "application/json": {"schema": {"$ref": _REF.format(model=model.__name__)}}
            },
        }
    }


def replies(model: type[BaseModel], streamed: bool = False) -> dict[int | str, Any]:
    """`responses` of a route answering `model` as JSON (and, when `streamed`, as server-sent
    events of the same objects, ending with `data: [DONE]`)."""
    content: dict[str, Any] = {
        "application/json": {"schema": {"$ref": _REF.format(model=model.__name__)}}
    }
    if streamed:
        content["text/event-stream"] = {"schema": {"type": "string"}}
    return {200: {"description": "Success", "content": content}}


def publish(
    app: FastAPI, requests: list[type[BaseModel]], responses: list[type[BaseModel]]
) -> None:
    """Make `app`'s OpenAPI document carry these models' schemas as components."""

    def document() -> dict[str, Any]:
        if app.openapi_schema is None:
            spec = get_openapi(title=app.title, version=app.version, routes=app.routes)
            pairs = [(m, "validation") for m in requests] + [
                (m, "serialization") for m in responses
            ]
            _, schemas = models_json_schema(pairs, ref_template=_REF)  # type: ignore[arg-type]
            components = spec.setdefault("components", {}).setdefault("schemas", {})
            for name, schema in schemas.get("$defs", {}).items():
                components.setdefault(name, schema)
            _errors_are_400s(spec)
            app.openapi_schema = spec
        return app.openapi_schema

    app.openapi = document  # type: ignore[method-assign]


def _errors_are_400s(spec: dict[str, Any]) -> None:
    """FastAPI documents its own 422 for invalid input; these routes answer 400 in OpenAI's
    error shape instead (the error handlers translate), so the document says that."""
    for operations in spec.get("paths", {}).values():
        for operation in operations.values():
            responses = operation.get("responses", {})
            responses.pop("422", None)
            responses["400"] = {
                "description": "Invalid request (the message names the field in `param`)",
                "content": {
                    "application/json": {"schema": {"$ref": _REF.format(model="ErrorResponse")}}
                },
            }
    for unused in ("HTTPValidationError", "ValidationError"):
        spec["components"]["schemas"].pop(unused, None)
