"""The OpenAPI document is the contract, checked by schemathesis with every check it has: bodies
generated from each route's published schema are accepted, or refused only for the reasons the
document itself lists (`x-refusals-of-valid-bodies`: rules across fields, and limits that depend
on the model or the server's settings); bodies it forbids are refused; every status, content type,
header and body (stream events included) is the documented one; and the stateful phase follows the
document's links (`GET /v1/models` -> a generation's `model`, `/tokenize` -> `/detokenize`)."""

from __future__ import annotations

import asyncio
import re
from collections.abc import Callable
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import CHECKS, load_all_checks, max_response_time
from schemathesis.core.failures import FailureGroup
from schemathesis.openapi.checks import RejectedPositiveData
from schemathesis.specs.openapi.schemas import OpenApiSchema

from backend.ingress.routes import build_api
from backend.replica.model_server import ModelServer
from backend.settings import BackendSettings
from tests.fakes import Script, scripted_engine

ROUTES = ["/v1/chat/completions", "/v1/completions", "/tokenize", "/detokenize"]
# Every check schemathesis 4.32 registers (`st run --checks all`), and the response time limit
# that `--checks all` adds; a schemathesis that registers another fails `test_all_checks_run`.
CHECK_NAMES = [
    "not_a_server_error",
    "status_code_conformance",
    "content_type_conformance",
    "response_headers_conformance",
    "response_schema_conformance",
    "negative_data_rejection",
    "positive_data_acceptance",
    "missing_required_header",
    "unsupported_method",
    "allow_header_conformance",
    "use_after_free",
    "ensure_resource_availability",
    "ignored_auth",
    "object_level_authorization",
]
load_all_checks()
ALL_CHECKS: list[Callable[..., Any]] = [*CHECKS.get_by_names(CHECK_NAMES), max_response_time]
CONFIG = {
    "generation": {"mode": "all", "deterministic": True, "max-examples": 25},
    "phases": {"stateful": {"max-steps": 6}},
    "checks": {
        # 413 refuses a body too (one of LLM_MAX_REQUEST_BYTES); schemathesis does not list it.
        "negative_data_rejection": {
            "expected-statuses": [400, 401, 403, 404, 405, 406, 409, 413, 415, 422, 428, 429]
        },
    },
}
SETTINGS = settings(
    deadline=None,
    suppress_health_check=list(HealthCheck),  # slow and filtered generation are expected here
    database=None,
)


def _app() -> Any:
    server_settings = BackendSettings(
        max_tokens_cap=32, default_max_tokens=16, max_request_bytes=4096
    )
    model_server = ModelServer(server_settings, scripted_engine(Script()))
    asyncio.run(model_server.start())  # the engine is loaded in a thread: no loop is kept
    return build_api(model_server, server_settings)


schema: OpenApiSchema = schemathesis.openapi.from_asgi(
    "/openapi.json", _app(), config=schemathesis.Config.from_dict(CONFIG)
)


def validate(case: schemathesis.Case, response: schemathesis.Response) -> None:
    """Every check; a valid body's refusal passes only if the operation lists its reason."""
    try:
        case.validate_response(response, checks=ALL_CHECKS)
    except FailureGroup as group:
        unexplained = [f for f in group.exceptions if not _documented(case, response, f)]
        if unexplained:
            raise FailureGroup(unexplained, str(group)) from None


def _documented(case: schemathesis.Case, response: schemathesis.Response, failure: Any) -> bool:
    if not isinstance(failure, RejectedPositiveData):
        return False
    refusals = case.operation.definition.raw.get("x-refusals-of-valid-bodies", [])
    message = response.json()["error"]["message"]
    return any(
        r["status"] == response.status_code and re.search(r["message"], message) for r in refusals
    )


def test_all_checks_run() -> None:
    assert sorted(CHECKS.get_all_names()) == sorted(CHECK_NAMES)


@pytest.mark.parametrize("route", ROUTES)
def test_every_route_publishes_its_request_and_400(route: str) -> None:
    operation = schema.raw_schema["paths"][route]["post"]
    assert operation["requestBody"]["required"] is True
    assert "400" in operation["responses"] and "422" not in operation["responses"]


@schema.parametrize()
@SETTINGS
def test_the_server_keeps_the_contract(case: schemathesis.Case) -> None:
    validate(case, case.call())


class Stateful(schema.as_state_machine()):  # type: ignore[misc]
    def validate_response(
        self, response: schemathesis.Response, case: schemathesis.Case, **kwargs: Any
    ) -> None:
        validate(case, response)


def test_the_document_links_what_feeds_what() -> None:
    """Without links the stateful phase has nothing to chain."""
    paths = schema.raw_schema["paths"]
    assert paths["/v1/models"]["get"]["responses"]["200"]["links"]
    assert paths["/tokenize"]["post"]["responses"]["200"]["links"]


def test_the_server_keeps_the_contract_across_linked_calls() -> None:
    Stateful.run(settings=settings(SETTINGS, max_examples=15, stateful_step_count=6))
