"""The OpenAPI document is the contract: bodies generated from each route's published schema
are accepted, or refused only for the reasons the API documents (rules across fields, and
limits that depend on the model or the server's settings)."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis_jsonschema import from_schema
from starlette.testclient import TestClient

from backend.api import build_api
from backend.model_server import ModelServer
from backend.settings import BackendSettings

# The reasons a body that follows the schema may still be refused, as the API documents them.
DOCUMENTED = re.compile(
    "|".join(
        [
            "top_logprobs needs logprobs",
            "ignore_eos cannot be combined",
            "needs a 'json_schema' object",
            "give either 'prompt' or 'messages'",
            "The JSON schema cannot be used",
            "maximum context length",  # the model's window
            "above this server's limit",  # LLM_MAX_TOKENS_CAP
            "larger than the limit",  # LLM_MAX_REQUEST_BYTES
            "The tokens cannot be decoded",  # ids beyond the vocabulary
            "does not exist; this server serves",  # another model's name
            # A message's fields across its role (README: what the API honours).
            "content is required",
            "has a tool_call_id",
            "only an assistant message has tool_calls",
            "tool_choice",  # with tools: 'auto' has no parser; a name must be in tools
            "best_of must equal n",
        ]
    )
)
ROUTES = ["/v1/chat/completions", "/v1/completions", "/tokenize", "/detokenize"]


@pytest.fixture(scope="module")
def http(server_settings: BackendSettings) -> Iterator[TestClient]:
    from tests.fakes import Script, scripted_engine

    model_server = ModelServer(server_settings, scripted_engine(Script()))
    with TestClient(build_api(model_server, server_settings)) as client:
        client.portal.call(model_server.start)  # type: ignore[union-attr]
        yield client


@pytest.fixture(scope="module")
def server_settings() -> BackendSettings:
    return BackendSettings(max_tokens_cap=32, default_max_tokens=16, max_request_bytes=4096)


def body_schema(spec: dict[str, Any], route: str) -> dict[str, Any]:
    """The route's published request schema, with the components it refers to, standalone."""
    ref = spec["paths"][route]["post"]["requestBody"]["content"]["application/json"]["schema"]
    text = json.dumps({**ref, "definitions": spec["components"]["schemas"]})
    return dict(json.loads(text.replace("#/components/schemas/", "#/definitions/")))


@pytest.mark.parametrize("route", ROUTES)
def test_every_route_publishes_its_request_and_400(http: TestClient, route: str) -> None:
    operation = http.get("/openapi.json").json()["paths"][route]["post"]
    assert operation["requestBody"]["required"] is True
    assert "400" in operation["responses"] and "422" not in operation["responses"]


@pytest.mark.parametrize("route", ROUTES)
@settings(
    max_examples=40,
    derandomize=True,  # the same bodies on every run: CI is repeatable
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(data=st.data())
def test_bodies_from_the_published_schema_are_accepted(
    http: TestClient, route: str, data: st.DataObject
) -> None:
    schema = body_schema(http.get("/openapi.json").json(), route)
    body = data.draw(from_schema(schema))
    response = http.post(route, json=body)
    if response.status_code in (200,):
        return
    error = response.json()["error"]
    assert response.status_code in (400, 404, 413), (body, error)
    assert DOCUMENTED.search(error["message"]), (body, error)
