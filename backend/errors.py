"""The backend's error tree, each error knowing its HTTP status and OpenAI error `type`.

    ServiceError
    ├── InvalidRequestError      400  bad field, bad JSON, prompt too long
    ├── AuthenticationError      401  missing or wrong bearer key (`LLM_API_KEY` set)
    ├── NotFoundError            404  unknown model or route
    ├── RequestTooLargeError     413  body above `LLM_MAX_REQUEST_BYTES`
    ├── OverloadedError          503  model still loading, or too many queued requests
    └── EngineError              500  the engine failed while generating

Engines and the serving layer raise only these; foreign exceptions are translated where they
enter (the engine boundary, the HTTP boundary).
"""

from __future__ import annotations

from typing import Any, ClassVar


class ServiceError(Exception):
    """Base class: an error that is reported to the client in OpenAI's error shape."""

    status_code: ClassVar[int] = 500
    error_type: ClassVar[str] = "internal_error"

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code

    def __reduce__(self) -> tuple[Any, ...]:
        # Keyword-only context must survive pickling across Ray processes.
        return (_rebuild, (type(self), self.message, self.param, self.code))

    def to_dict(self) -> dict[str, Any]:
        """The OpenAI error body: `{"error": {"message", "type", "param", "code"}}`."""
        return {
            "error": {
                "message": self.message,
                "type": self.error_type,
                "param": self.param,
                "code": self.code,
            }
        }


def _rebuild(
    cls: type[ServiceError], message: str, param: str | None, code: str | None
) -> ServiceError:
    return cls(message, param=param, code=code)


class InvalidRequestError(ServiceError):
    """Raised when a request is malformed or asks for something the model cannot do."""

    status_code = 400
    error_type = "invalid_request_error"


class AuthenticationError(ServiceError):
    """Raised when `LLM_API_KEY` is set and a request lacks one of its keys."""

    status_code = 401
    # OpenAI's own 401 body: type invalid_request_error, code invalid_api_key.
    error_type = "invalid_request_error"


class NotFoundError(ServiceError):
    """Raised for an unknown model id or route."""

    status_code = 404
    error_type = "not_found_error"


class RequestTooLargeError(ServiceError):
    """Raised when a request body is larger than the configured limit."""

    status_code = 413
    error_type = "invalid_request_error"


class OverloadedError(ServiceError):
    """Raised while the model is loading or when the request queue is full; retry later."""

    status_code = 503
    error_type = "service_unavailable_error"


class EngineError(ServiceError):
    """Raised when the engine fails while generating."""

    status_code = 500
    error_type = "internal_error"


def rejection_reason(error: ServiceError) -> str:
    """The `reason` label of a request refused with `error` (metrics)."""
    if isinstance(error, OverloadedError):
        return "overloaded"
    if isinstance(error, NotFoundError):
        return "not_found"
    return "invalid"
