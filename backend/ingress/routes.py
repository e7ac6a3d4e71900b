"""HTTP routes of the backend (FastAPI): thin handlers that validate, delegate, and map errors."""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncGenerator
from typing import Any, TypeVar

from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ValidationError
from starlette.types import Receive, Scope, Send

from backend.errors import (
    EngineError,
    InvalidRequestError,
    NotFoundError,
    OverloadedError,
    RequestTooLargeError,
    ServiceError,
)
from backend.ingress.auth import BearerKeyMiddleware
from backend.ingress.disconnects import ClientDisconnects
from backend.ingress.openapi import Refusal, json_body, publish, replies
from backend.ingress.serving import ChatService, ModelClient
from backend.ingress.text_completions import CompletionService
from backend.protocol import (
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatMessage,
    CompletionRequest,
    CompletionResponse,
    DetokenizeRequest,
    DetokenizeResponse,
    ErrorResponse,
    HealthStatus,
    ModelCard,
    ModelList,
    TokenizeRequest,
    TokenizeResponse,
    now,
    validation_param,
)
from backend.settings import BackendSettings

logger = logging.getLogger(__name__)

RequestT = TypeVar("RequestT", bound=BaseModel)

_LOADING = "The model is still loading; retry in a few seconds."
# Server-sent events must not be buffered by proxies (nginx honours this header).
_SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}

# What a route that reads a body and reaches the model may answer besides 200 (and 500).
_BODY_ERRORS = (400, 404, 413, 503)
# Why a body that follows a route's schema may still be refused: rules across fields, and limits
# of the model or the server's settings, which JSON Schema cannot state (each route publishes its
# own as `x-refusals-of-valid-bodies`).
_MESSAGE_RULES = (
    Refusal("content is required", "A message has content, but an assistant one with tool_calls"),
    Refusal("has a tool_call_id", "A `tool` message, and only it, has a tool_call_id"),
    Refusal("only an assistant message has tool_calls", "Only an assistant has tool_calls"),
)
_GENERATION_LIMITS = (
    Refusal("maximum context length", "The prompt and max_tokens must fit the model's window"),
    Refusal(
        "above this server's limit",
        "max_tokens at most LLM_MAX_TOKENS_CAP; n at most LLM_MAX_CHOICES and LLM_MAX_BATCH_SIZE",
    ),
    Refusal("logit_bias names token ids", "logit_bias names tokens of the model's vocabulary"),
)
_CHAT_RULES = (
    *_MESSAGE_RULES,
    *_GENERATION_LIMITS,
    Refusal("top_logprobs needs logprobs", "top_logprobs needs logprobs: true"),
    Refusal("ignore_eos cannot be combined", "ignore_eos excludes a JSON reply and tool calls"),
    Refusal("stop cannot be combined", "stop excludes a JSON reply and tools"),
    Refusal("needs a 'json_schema' object", "response_format json_schema needs its json_schema"),
    Refusal("The JSON schema cannot be used", "A schema the grammar compiler cannot compile"),
    Refusal("The tools cannot be used", "Tools whose grammar the compiler cannot compile"),
    Refusal(
        "tool_choice",
        "tool_choice needs tools and names one of them; with tools, no JSON response_format",
    ),
)
_COMPLETION_RULES = (
    *_GENERATION_LIMITS,
    Refusal("best_of must equal n", "best_of, if given, equals n (each candidate is returned)"),
)
_TOKENIZE_RULES = (*_MESSAGE_RULES, Refusal("give either 'prompt' or 'messages'", "One of them"))
_DETOKENIZE_RULES = (
    Refusal("The tokens cannot be decoded", "Token ids beyond the model's vocabulary"),
)
# Operations whose 200 feeds another's body (OpenAPI links: schemathesis' stateful phase follows
# them): the served model's id, and tokens back to their text.
_SERVED_MODEL = {"model": "$response.body#/data/0/id"}
_MODEL_LINKS = {
    name: {"operationId": name, "requestBody": _SERVED_MODEL}
    for name in ("createChatCompletion", "createCompletion", "tokenize", "detokenize")
}
_TOKENS_LINK = {
    "detokenize": {"operationId": "detokenize", "requestBody": {"tokens": "$response.body#/tokens"}}
}


def build_api(client: ModelClient, settings: BackendSettings) -> FastAPI:
    """The FastAPI app: OpenAI routes, health, and the blueprint's `/infer`; with keys set,
    every route but `/healthz` requires one."""
    app = FastAPI(title="Mistral chat backend", version="0.1.0")
    service = ChatService(client)
    completions = CompletionService(client)
    _add_error_handlers(app)
    keys = settings.api_keys()
    if keys:
        app.add_middleware(BearerKeyMiddleware, keys=keys)
    # Added last, so outermost: a client that leaves ends the request quietly in every layer.
    app.add_middleware(ClientDisconnects)

    @app.post(
        "/v1/chat/completions",
        operation_id="createChatCompletion",
        response_model=None,
        openapi_extra=json_body(ChatCompletionRequest, _CHAT_RULES),
        responses=replies(ChatCompletionResponse, *_BODY_ERRORS, chunk=ChatCompletionChunk),
    )
    async def chat_completions(raw: Request) -> Response:
        """OpenAI Chat Completions, streamed as SSE when `stream` is true."""
        body = await _read_body(raw, settings.max_request_bytes)
        return _reply(await service.create(_parse(ChatCompletionRequest, body)))

    @app.post(
        "/v1/completions",
        operation_id="createCompletion",
        response_model=None,
        openapi_extra=json_body(CompletionRequest, _COMPLETION_RULES),
        responses=replies(CompletionResponse, *_BODY_ERRORS, chunk=CompletionResponse),
    )
    async def text_completions(raw: Request) -> Response:
        """OpenAI's legacy text completion of one prompt, streamed as SSE when `stream` is
        true (no chat template: the prompt is continued as it is)."""
        body = await _read_body(raw, settings.max_request_bytes)
        return _reply(await completions.create(_parse(CompletionRequest, body)))

    @app.post(
        "/tokenize",
        operation_id="tokenize",
        openapi_extra=json_body(TokenizeRequest, _TOKENIZE_RULES),
        responses=replies(None, *_BODY_ERRORS, links=_TOKENS_LINK),
    )
    async def tokenize(raw: Request) -> TokenizeResponse:
        """vLLM's tokenizer route: a prompt's (or a conversation's) token ids."""
        body = await _read_body(raw, settings.max_request_bytes)
        return await client.tokenize(_parse(TokenizeRequest, body))

    @app.post(
        "/detokenize",
        operation_id="detokenize",
        openapi_extra=json_body(DetokenizeRequest, _DETOKENIZE_RULES),
        responses=replies(None, *_BODY_ERRORS),
    )
    async def detokenize(raw: Request) -> DetokenizeResponse:
        """vLLM's detokenizer route: the text of token ids."""
        body = await _read_body(raw, settings.max_request_bytes)
        return await client.detokenize(_parse(DetokenizeRequest, body))

    @app.get(
        "/v1/models", operation_id="listModels", responses=replies(None, 503, links=_MODEL_LINKS)
    )
    async def list_models() -> ModelList:
        """The served model (503 while it loads)."""
        info = await client.info()
        if not info.ready or info.model_id is None:
            raise OverloadedError(info.error or _LOADING)
        card = ModelCard(id=info.model_id, created=now(), max_model_len=info.context_window)
        return ModelList(data=[card])

    @app.get(
        "/healthz",
        responses={200: {"model": HealthStatus}, 503: {"model": HealthStatus}},
    )
    async def healthz() -> JSONResponse:
        """200 while a model replica can serve; 503 while it loads (`loading`) or when none can
        (`unavailable`: loading failed, or every replica has stopped)."""
        info = await client.info()
        if info.ready:
            return JSONResponse({"status": "ok", "model": info.model_id})
        status = "unavailable" if info.error else "loading"
        return JSONResponse({"status": status, "error": info.error or _LOADING}, status_code=503)

    @app.get("/health", response_class=Response, responses=replies(None, 503))
    async def health() -> Response:
        """vLLM's health route (benchmark clients probe it): 200 with no body while a model
        replica can serve, else 503 with why, in OpenAI's error shape."""
        info = await client.info()
        if info.ready:
            return Response(status_code=200)
        raise OverloadedError(info.error or _LOADING)

    @app.get("/infer", responses=replies(None, 503))
    async def infer(
        sentence: str = Query(min_length=1, max_length=settings.max_request_bytes, pattern=r"\S"),
    ) -> list[str]:
        """The original blueprint's endpoint: one user message in, the reply alone out."""
        request = ChatCompletionRequest(messages=[ChatMessage(role="user", content=sentence)])
        return [await service.reply_text(request)]

    publish(
        app,
        requests=[ChatCompletionRequest, CompletionRequest, TokenizeRequest, DetokenizeRequest],
        responses=[ChatCompletionResponse, ChatCompletionChunk, CompletionResponse, ErrorResponse],
        authenticated=bool(keys),
    )
    return app


def _reply(result: BaseModel | AsyncGenerator[str, None]) -> Response:
    """A whole response as JSON, or a stream of server-sent events."""
    if isinstance(result, BaseModel):
        return JSONResponse(result.model_dump())
    return _EventStream(result, media_type="text/event-stream", headers=_SSE_HEADERS)


class _EventStream(StreamingResponse):
    """A stream of server-sent events that closes its events however the response ends.

    When the client leaves, Starlette cancels the task that reads the events and leaves their
    generator suspended: only garbage collection would close it, and with it the generation on
    the model replica. Closing it here cancels that generation at once.
    """

    def __init__(self, events: AsyncGenerator[str, None], **options: Any) -> None:
        super().__init__(events, **options)
        self._events = events

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self._events.aclose()


async def _read_body(raw: Request, limit: int) -> bytes:
    declared = raw.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise _too_large(limit)
    body = bytearray()
    async for chunk in raw.stream():
        body += chunk
        if len(body) > limit:
            raise _too_large(limit)
    return bytes(body)


def _too_large(limit: int) -> RequestTooLargeError:
    return RequestTooLargeError(f"The request body is larger than the limit of {limit} bytes.")


def _parse(model: type[RequestT], body: bytes) -> RequestT:
    try:
        data: Any = json.loads(body, parse_float=_json_number)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InvalidRequestError(f"The body is not valid JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise InvalidRequestError("The body must be a JSON object.")
    try:
        # Strict: JSON's types as the schema publishes them (no "1" for 1, no 0 for false).
        return model.model_validate(data, strict=True)
    except ValidationError as exc:
        # The deepest complaint names the field: a union's other members fail at its top.
        raise _invalid(max(exc.errors(), key=lambda error: len(error["loc"]))) from exc


def _json_number(text: str) -> float | int:
    """A JSON number with a fraction or an exponent, as JSON Schema reads it: `1.0` and `1e2`
    are integers (strict validation takes no float for an int)."""
    value = float(text)
    return int(value) if value.is_integer() else value


def _invalid(error: Any) -> InvalidRequestError:
    """The client's error for pydantic's first complaint; a field the server does not know is
    one it does not honour."""
    param = validation_param(error["loc"])
    if error["type"] == "extra_forbidden":
        return InvalidRequestError(
            f"'{param}' is not supported by this server (see docs/api.md, what the API honours); "
            "remove it from the request.",
            param=param,
            code="unsupported_parameter",
        )
    return InvalidRequestError(f"Invalid '{param}': {error['msg']}.", param=param)


def _add_error_handlers(app: FastAPI) -> None:
    async def service_error(_: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, ServiceError)
        headers = {"Retry-After": "5"} if isinstance(exc, OverloadedError) else None
        return JSONResponse(exc.to_dict(), status_code=exc.status_code, headers=headers)

    async def query_error(_: Request, exc: Exception) -> JSONResponse:
        errors = exc.errors() if hasattr(exc, "errors") else []
        param = validation_param(errors[0]["loc"]) if errors else None
        message = f"Invalid '{param}': {errors[0]['msg']}." if errors else str(exc)
        return JSONResponse(InvalidRequestError(message, param=param).to_dict(), status_code=400)

    async def not_found(_: Request, exc: Exception) -> JSONResponse:
        return JSONResponse(NotFoundError("No such route.").to_dict(), status_code=404)

    async def unexpected(_: Request, exc: Exception) -> JSONResponse:
        logger.error("unhandled error: %r", exc, exc_info=exc)  # the client sees no traceback
        error = EngineError(f"The server failed to handle the request ({type(exc).__name__}).")
        return JSONResponse(error.to_dict(), status_code=500)

    app.add_exception_handler(ServiceError, service_error)
    app.add_exception_handler(Exception, unexpected)
    app.add_exception_handler(RequestValidationError, query_error)
    app.add_exception_handler(404, not_found)
