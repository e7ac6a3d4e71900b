"""The handle boundary: every Ray exception becomes one of our errors, without a traceback."""

from __future__ import annotations

import pytest
from ray.exceptions import RayActorError, RayTaskError
from ray.serve.exceptions import BackPressureError

from backend.app import translate_ray_error
from backend.errors import EngineError, InvalidRequestError, OverloadedError


def raised_in_replica(cause: Exception) -> RayTaskError:
    """What the ingress receives when the replica raises `cause` (an instance of both)."""
    return RayTaskError("generate", "Traceback (most recent call last):\n  secret.py", cause)


def test_a_replica_error_comes_back_as_itself_without_the_remote_traceback() -> None:
    cause = InvalidRequestError("too long", param="messages", code="context_length_exceeded")
    error = translate_ray_error(raised_in_replica(cause).as_instanceof_cause())
    assert type(error) is InvalidRequestError
    assert error.to_dict()["error"] == {
        "message": "too long",
        "type": "invalid_request_error",
        "param": "messages",
        "code": "context_length_exceeded",
    }


@pytest.mark.parametrize(
    ("exc", "expected"),
    [
        (BackPressureError(num_queued_requests=300, max_queued_requests=256), OverloadedError),
        (RayActorError(), OverloadedError),
        (raised_in_replica(RuntimeError("device lost")), EngineError),
        (RuntimeError("anything else"), EngineError),
    ],
)
def test_ray_errors_map_to_a_status_and_a_clean_message(
    exc: Exception, expected: type[Exception]
) -> None:
    error = translate_ray_error(exc)
    assert type(error) is expected
    assert "Traceback" not in error.message and "secret.py" not in error.message
