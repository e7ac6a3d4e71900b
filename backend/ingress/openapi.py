"""The OpenAPI document as the contract: routes that read their body raw (to enforce the size
limit while reading) still publish the request and response schemas they validate against, every
status they can answer, and what a body that follows its schema may still be refused for.

The schemas are pydantic's own (validation mode for requests, serialization mode for responses),
so `/docs`, SDK generators and fuzzers see exactly what the routes accept and return.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from backend.ingress.auth import OPEN_PATHS

_REF = "#/components/schemas/{model}"
# Why each error status is answered (every one in OpenAI's error shape).
_ERRORS = {
    400: "Invalid request (the message names the field in `param`)",
    404: "The `model` asked for is not the one this server serves (see GET /v1/models)",
    413: "The body is larger than the server's limit (LLM_MAX_REQUEST_BYTES)",
    500: "The server failed: the engine, or an unexpected error",
    503: "The model is still loading, or too many requests are queued: retry after Retry-After",
}
_AUTH_ERROR = "Missing or wrong API key (`Authorization: Bearer <key>`; LLM_API_KEY is set)"
_RETRY_AFTER = {"Retry-After": {"description": "Seconds to wait", "schema": {"type": "integer"}}}


@dataclass(frozen=True)
class Refusal:
    """A reason to refuse a body that follows the route's schema: a rule across fields, or a
    limit of the model or the server, which JSON Schema cannot state. Its error message contains
    `message`."""

    message: str
    why: str
    status: int = 400

    def published(self) -> dict[str, Any]:
        return {"status": self.status, "message": self.message, "why": self.why}


# Every body is read with the size limit: a reason to refuse one the schema admits.
_TOO_LARGE = Refusal("larger than the limit", _ERRORS[413], status=413)


def json_body(model: type[BaseModel], refusals: Iterable[Refusal] = ()) -> dict[str, Any]:
    """`openapi_extra` of a route whose JSON body is `model`, read with the size limit: the body,
    and (as `x-refusals-of-valid-bodies`) why one that follows its schema may be refused."""
    return {
        "requestBody": {
            "required": True,
            "content": {
                "application/json": {"schema": {"$ref": _REF.format(model=model.__name__)}}
            },
        },
        "x-refusals-of-valid-bodies": [r.published() for r in [*refusals, _TOO_LARGE]],
    }


def replies(
    model: type[BaseModel] | None,
    *errors: int,
    chunk: type[BaseModel] | None = None,
    links: dict[str, Any] | None = None,
) -> dict[int | str, Any]:
    """`responses` of a route answering `model` as JSON (and, given the `chunk` model, as
    server-sent events), or the `errors` statuses in OpenAI's error shape; `links` say which
    other operations a 200's body feeds. A None `model` leaves the 200 to the route."""
    ok: dict[str, Any] = {"description": "Success"}
    if model is not None:
        ok["content"] = {"application/json": {"schema": _ref(model)}}
    if chunk is not None:
        ok["content"]["text/event-stream"] = {"schema": _event(chunk)}
    if links:
        ok["links"] = links
    return {200: ok, **{status: _error(status) for status in errors}}


def _ref(model: type[BaseModel] | str) -> dict[str, str]:
    return {"$ref": _REF.format(model=model if isinstance(model, str) else model.__name__)}


def _error(status: int, description: str | None = None) -> dict[str, Any]:
    response: dict[str, Any] = {
        "description": description or _ERRORS[status],
        "content": {"application/json": {"schema": _ref("ErrorResponse")}},
    }
    if status == 503:
        response["headers"] = _RETRY_AFTER
    return response


def _event(chunk: type[BaseModel]) -> dict[str, Any]:
    """One server-sent event of a stream (in OpenAPI 3.1 a stream's schema is read per event):
    a chunk, an error once the status line is gone, or the last one, `[DONE]`."""
    payload = {"anyOf": [_ref(chunk), _ref("ErrorResponse")]}
    return {
        "type": "object",
        "required": ["data"],
        "properties": {
            "event": {"const": "message"},
            "data": {
                "type": "string",
                "if": {"const": "[DONE]"},
                "else": {"contentMediaType": "application/json", "contentSchema": payload},
            },
        },
    }


def publish(
    app: FastAPI,
    requests: list[type[BaseModel]],
    responses: list[type[BaseModel]],
    authenticated: bool = False,
) -> None:
    """Make `app`'s OpenAPI document carry these models' schemas as components, and every route
    its 500 (the handler of unexpected errors) and, when keys are `authenticated`, its 401."""

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
            _errors_in_openai_shape(spec, authenticated)
            app.openapi_schema = spec
        return app.openapi_schema

    app.openapi = document  # type: ignore[method-assign]


def _errors_in_openai_shape(spec: dict[str, Any], authenticated: bool) -> None:
    """FastAPI documents its own 422 for invalid input; these routes answer 400 in OpenAI's
    error shape instead (the error handlers translate), so the document says that."""
    for path, operations in spec.get("paths", {}).items():
        for operation in operations.values():
            responses = operation.setdefault("responses", {})
            if responses.pop("422", None) is not None:
                responses["400"] = _error(400)
            responses["500"] = _error(500)
            if authenticated and path not in OPEN_PATHS:
                responses["401"] = _error(401, _AUTH_ERROR)
                operation["security"] = [{"bearer": []}]
    if authenticated:
        schemes = spec["components"].setdefault("securitySchemes", {})
        schemes["bearer"] = {"type": "http", "scheme": "bearer"}
    for unused in ("HTTPValidationError", "ValidationError"):
        spec["components"]["schemas"].pop(unused, None)
