"""Backend clients: one interface over `httpx.AsyncClient`, two implementations, one error tree.

    BackendError
    ├── BackendUnavailable   no connection, or no answer in time (nothing of the reply received)
    ├── BackendHTTPError     the backend answered with an error status (4xx/5xx, or a redirect);
    │                        carries the server's message and the status code
    ├── StreamInterrupted    the reply broke off: cut before its end, an error event mid-stream,
    │                        or data that cannot be read
    └── UnsupportedOption    the selected API cannot honour an option (JSON output or tools over
                             `infer`); raised before any request is made

Clients raise only these. httpx's exceptions are translated where they enter (`raise … from exc`),
so callers never see a bare `httpx` exception.
"""

from __future__ import annotations

import codecs
import re
from abc import ABC, abstractmethod
from collections.abc import AsyncGenerator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import httpx
from pydantic import BaseModel, ValidationError

from chatui.settings import ChatUISettings
from chatui.tools import FunctionCall, ToolCall, ToolRequest

Messages = Sequence[Mapping[str, Any]]


class BackendError(Exception):
    """Base class: the backend could not produce a reply; the message is meant for the user."""


class BackendUnavailable(BackendError):
    """Raised when the backend cannot be reached or does not answer within the timeouts."""


class BackendHTTPError(BackendError):
    """Raised when the backend answers with a non-2xx status; `str(exc)` is the server's message."""

    def __init__(self, message: str, *, status_code: int) -> None:
        super().__init__(message)
        self.message = message
        self.status_code = status_code


class StreamInterrupted(BackendError):
    """Raised when a reply breaks off; the text received before it has already been delivered."""


class UnsupportedOption(BackendError):
    """Raised before any request when the client's API cannot honour an option of the reply;
    the message names the option and the setting that makes it possible."""


@dataclass(frozen=True)
class ChatOptions:
    """Sampling options of one reply."""

    temperature: float
    top_p: float
    max_tokens: int
    json_output: bool = False  # the reply is one JSON object (the backend constrains it)
    tools: ToolRequest | None = None  # the reply is a call of these functions


@dataclass(frozen=True)
class Usage:
    """Token counts reported by the backend for one reply."""

    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    cached_tokens: int = 0  # prompt tokens the backend reused from its KV cache


@dataclass(frozen=True)
class TextDelta:
    """A piece of the reply's text."""

    text: str


@dataclass(frozen=True)
class ToolCalls:
    """The calls the reply made, complete (sent once the stream has them all)."""

    calls: tuple[ToolCall, ...]


@dataclass(frozen=True)
class Finished:
    """The last event of a reply: why it ended and, when the backend reports it, the usage."""

    finish_reason: str
    usage: Usage | None = None


StreamEvent = TextDelta | ToolCalls | Finished


@dataclass(frozen=True)
class BackendStatus:
    """What a health check found: state, served model and its context window (when known)."""

    state: Literal["ready", "loading", "unreachable"]
    model: str | None = None
    context_window: int | None = None
    detail: str = ""


class ChatClient(ABC):
    """A backend: streams replies to whole conversations and reports its health."""

    def __init__(
        self,
        base_url: str,
        *,
        timeout: httpx.Timeout,
        api_key: str | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.base_url = base_url
        self._health_timeout = httpx.Timeout(timeout.connect)
        self._http = httpx.AsyncClient(
            base_url=base_url, timeout=timeout, headers=headers, transport=transport
        )

    @abstractmethod
    def stream_chat(
        self, messages: Messages, options: ChatOptions
    ) -> AsyncGenerator[StreamEvent, None]:
        """Text deltas of the reply to `messages`, its `ToolCalls` if it made any, then one
        `Finished`; raises `BackendError`s."""

    @abstractmethod
    async def health(self) -> BackendStatus:
        """The backend's state right now; never raises (an unreachable backend is a state)."""

    async def aclose(self) -> None:
        """Close the connection pool."""
        await self._http.aclose()

    async def _send(self, request: httpx.Request, *, stream: bool = False) -> httpx.Response:
        """Send `request`; a non-2xx status becomes `BackendHTTPError`, a transport error
        `BackendUnavailable`. A streamed response must be closed by the caller."""
        try:
            response = await self._http.send(request, stream=stream)
        except httpx.HTTPError as exc:
            raise BackendUnavailable(self._describe(exc)) from exc
        if not response.is_success:  # 4xx/5xx, and redirects (not followed: a wrong URL)
            try:
                await response.aread()
            except httpx.HTTPError:
                pass  # the status alone still says what went wrong
            finally:
                await response.aclose()
            raise BackendHTTPError(_error_message(response), status_code=response.status_code)
        return response

    async def _probe(
        self, path: str, *, ready_if_missing: bool = False
    ) -> httpx.Response | BackendStatus:
        """GET a health route: its response when it answers 200, else the status that implies
        (503 = loading; 404 = ready when the route may not exist; anything else = unreachable)."""
        request = self._http.build_request("GET", path, timeout=self._health_timeout)
        try:
            return await self._send(request)
        except BackendUnavailable as exc:
            return BackendStatus("unreachable", detail=str(exc))
        except BackendHTTPError as exc:
            if ready_if_missing and exc.status_code == 404:
                return BackendStatus("ready")
            if exc.status_code == 503:
                return BackendStatus("loading", detail=exc.message)
            return BackendStatus("unreachable", detail=f"HTTP {exc.status_code}: {exc.message}")

    def _describe(self, exc: httpx.HTTPError) -> str:
        """A user-facing sentence for a transport error."""
        where = f"the backend at {self.base_url}"
        if isinstance(exc, httpx.ConnectTimeout):
            return f"Could not connect to {where} in time (connect timeout)."
        if isinstance(exc, httpx.TimeoutException):
            return f"No answer from {where} in time ({type(exc).__name__})."
        if isinstance(exc, httpx.ConnectError):
            return f"Could not connect to {where}: {str(exc) or 'connection refused'}."
        return f"Lost the connection to {where} ({type(exc).__name__}: {exc})."


class OpenAIClient(ChatClient):
    """Any OpenAI-compatible server: `POST /v1/chat/completions` streamed as server-sent events.

    The model id learnt from the last successful `health()` is sent as `model` (servers that
    serve one model, like ours, accept its absence too).
    """

    _model: str | None = None

    async def stream_chat(
        self, messages: Messages, options: ChatOptions
    ) -> AsyncGenerator[StreamEvent, None]:
        """Stream the reply; the HTTP response is closed however the iteration ends."""
        body = {
            "messages": [dict(message) for message in messages],
            "stream": True,
            "stream_options": {"include_usage": True},
            "temperature": options.temperature,
            "top_p": options.top_p,
            "max_tokens": options.max_tokens,
        }
        if options.json_output:  # absent otherwise: a plain chat's request is unchanged
            body["response_format"] = {"type": "json_object"}
        if options.tools:  # the same
            body.update(options.tools.body())
        if self._model:
            body["model"] = self._model
        request = self._http.build_request("POST", "/v1/chat/completions", json=body)
        response = await self._send(request, stream=True)
        decoder = SSEDecoder()
        calls = _CallsBuilder()
        finish_reason: str | None = None
        usage: Usage | None = None
        delivered = done = False
        try:
            async for chunk in response.aiter_bytes():
                for payload in decoder.feed(chunk):
                    done = payload == "[DONE]"
                    if done:
                        break
                    event = _parse_chunk(payload)
                    usage = event.usage.to_usage() if event.usage else usage
                    for choice in event.choices:
                        if choice.delta.content:
                            delivered = True
                            yield TextDelta(choice.delta.content)
                        delivered = calls.add(choice.delta.tool_calls) or delivered
                        finish_reason = choice.finish_reason or finish_reason
                if done:
                    break  # stop reading: the finally frees the connection at once
        except httpx.HTTPError as exc:
            # Before any text a failed read is a backend that does not answer; after, a cut reply.
            error = StreamInterrupted if delivered else BackendUnavailable
            raise error(self._describe(exc)) from exc
        finally:
            await response.aclose()
        if finish_reason is None:
            raise StreamInterrupted("The backend closed the stream before the reply was finished.")
        if made := calls.calls():
            yield ToolCalls(made)
        yield Finished(finish_reason, usage)

    async def health(self) -> BackendStatus:
        """`GET /v1/models`: 200 = ready (model id, `max_model_len`), 503 = still loading."""
        response = await self._probe("/v1/models")
        if isinstance(response, BackendStatus):
            return response
        try:
            cards = _ModelList.model_validate_json(response.content).data
        except ValidationError:
            return BackendStatus("ready", detail="/v1/models sent an unexpected reply")
        if not cards:
            return BackendStatus("loading", detail="/v1/models lists no model yet")
        self._model = cards[0].id
        return BackendStatus("ready", model=cards[0].id, context_window=cards[0].max_model_len)


class InferClient(ChatClient):
    """The original blueprint's `GET /infer?sentence=…`: no streaming, the whole reply at once.

    The endpoint takes one sentence, so only the last user message is sent: the model does not
    see the earlier turns or the system prompt. No usage is reported.
    """

    async def stream_chat(
        self, messages: Messages, options: ChatOptions
    ) -> AsyncGenerator[StreamEvent, None]:
        """One `TextDelta` with the whole reply, then `Finished("stop")`."""
        option = "JSON output" if options.json_output else "Tools" if options.tools else None
        if option:
            raise UnsupportedOption(
                f"{option} needs the OpenAI API (CHATUI_BACKEND_API=openai): the blueprint's "
                "GET /infer cannot constrain a reply to JSON or ask for tool calls."
            )
        sentence = next((m["content"] for m in reversed(messages) if m["role"] == "user"), None)
        if sentence is None:
            raise ValueError("InferClient.stream_chat needs at least one user message")
        request = self._http.build_request("GET", "/infer", params={"sentence": sentence})
        response = await self._send(request)
        try:
            reply = response.json()
        except ValueError as exc:
            raise StreamInterrupted("The backend's /infer reply is not JSON.") from exc
        if not (isinstance(reply, list) and len(reply) == 1 and isinstance(reply[0], str)):
            raise StreamInterrupted("The backend's /infer reply is not a JSON list of one string.")
        yield TextDelta(reply[0])
        yield Finished("stop")

    async def health(self) -> BackendStatus:
        """`GET /healthz`: 503 = loading; the blueprint has no such route, so 404 = ready too."""
        response = await self._probe("/healthz", ready_if_missing=True)
        if isinstance(response, BackendStatus):
            return response
        try:
            model = _Health.model_validate_json(response.content).model
        except ValidationError:
            model = None
        return BackendStatus("ready", model=model)


def create_client(
    settings: ChatUISettings, *, transport: httpx.AsyncBaseTransport | None = None
) -> ChatClient:
    """The client selected by `CHATUI_BACKEND_API`, configured from `settings`."""
    cls = {"openai": OpenAIClient, "infer": InferClient}[settings.backend_api]
    timeout = httpx.Timeout(
        connect=settings.connect_timeout_s,
        read=settings.read_timeout_s,
        write=settings.connect_timeout_s,
        # Waiting for a pooled connection is waiting for the backend, like a connect.
        pool=settings.connect_timeout_s,
    )
    api_key = settings.api_key.get_secret_value() if settings.api_key else None
    return cls(settings.backend_url, timeout=timeout, api_key=api_key, transport=transport)


_LINE_END = re.compile(r"\r\n|\r|\n")


class SSEDecoder:
    """Incremental server-sent-events parser: bytes split anywhere in, `data` payloads out.

    Follows the SSE spec: lines end with CRLF, LF or CR; `:` starts a comment (keep-alive);
    `data` lines of one event are joined with newlines; a blank line dispatches the event; an
    event not ended by a blank line when the stream stops is dropped.
    """

    def __init__(self) -> None:
        # Invalid UTF-8 becomes U+FFFD rather than an exception the caller cannot map.
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._buffer = ""
        self._data: list[str] = []

    def feed(self, chunk: bytes) -> list[str]:
        """The payloads of the events that `chunk` completes."""
        self._buffer += self._decoder.decode(chunk)
        payloads: list[str] = []
        start = 0
        for match in _LINE_END.finditer(self._buffer):
            if match.group() == "\r" and match.end() == len(self._buffer):
                break  # maybe the first half of a CRLF split across chunks: wait for more
            payload = self._line(self._buffer[start : match.start()])
            if payload is not None:
                payloads.append(payload)
            start = match.end()
        self._buffer = self._buffer[start:]
        return payloads

    def _line(self, line: str) -> str | None:
        if not line:
            payload = "\n".join(self._data) if self._data else None
            self._data = []
            return payload
        field, _, value = line.partition(":")
        if field == "data":
            self._data.append(value.removeprefix(" "))
        return None  # comments, and the `event`/`id`/`retry` fields OpenAI streams do not use


class _FunctionDelta(BaseModel):
    name: str | None = None
    arguments: str | None = None


class _ToolCallDelta(BaseModel):
    index: int
    id: str | None = None
    function: _FunctionDelta = _FunctionDelta()


class _Delta(BaseModel):
    content: str | None = None
    tool_calls: list[_ToolCallDelta] | None = None


class _Choice(BaseModel):
    delta: _Delta = _Delta()
    finish_reason: str | None = None


class _PromptTokensDetails(BaseModel):
    cached_tokens: int = 0


class _Usage(BaseModel):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0
    prompt_tokens_details: _PromptTokensDetails | None = None

    def to_usage(self) -> Usage:
        details = self.prompt_tokens_details or _PromptTokensDetails()
        return Usage(
            self.prompt_tokens, self.completion_tokens, self.total_tokens, details.cached_tokens
        )


class _ErrorBody(BaseModel):
    message: str = "unknown error"


class _Chunk(BaseModel):
    choices: list[_Choice] = []
    usage: _Usage | None = None
    error: _ErrorBody | None = None


class _ModelCard(BaseModel):
    id: str
    max_model_len: int | None = None


class _ModelList(BaseModel):
    data: list[_ModelCard]


class _Health(BaseModel):
    model: str | None = None


class _ErrorReply(BaseModel):
    error: _ErrorBody

    def message(self) -> str:
        return self.error.message


class _HealthReply(BaseModel):
    status: str
    error: str

    def message(self) -> str:
        return self.error


class _CallsBuilder:
    """Tool calls put together from their deltas. This backend sends each call whole in one
    delta; OpenAI's servers send its id and name first, then its arguments in pieces."""

    def __init__(self) -> None:
        self._parts: dict[int, tuple[str, str, str]] = {}  # index -> (id, name, arguments)

    def add(self, deltas: list[_ToolCallDelta] | None) -> bool:
        """Add a chunk's call deltas; whether it had any."""
        for delta in deltas or []:
            call_id, name, arguments = self._parts.get(delta.index, ("", "", ""))
            self._parts[delta.index] = (
                delta.id or call_id,
                delta.function.name or name,
                arguments + (delta.function.arguments or ""),
            )
        return bool(deltas)

    def calls(self) -> tuple[ToolCall, ...]:
        """The complete calls, in their order."""
        parts = [self._parts[index] for index in sorted(self._parts)]
        if not all(call_id and name for call_id, name, _ in parts):
            raise StreamInterrupted("The backend sent a tool call without an id or a name.")
        return tuple(
            ToolCall(id=i, function=FunctionCall(name=n, arguments=a)) for i, n, a in parts
        )


def _parse_chunk(payload: str) -> _Chunk:
    try:
        chunk = _Chunk.model_validate_json(payload)
    except ValidationError as exc:
        raise StreamInterrupted(f"The backend sent an unreadable event: {payload[:200]!r}") from exc
    if chunk.error is not None:
        raise StreamInterrupted(f"The backend failed mid-answer: {chunk.error.message}")
    return chunk


def _error_message(response: httpx.Response) -> str:
    """The server's own message: OpenAI's `error.message`, `/healthz`'s `error`, else the start
    of the body."""
    for reply in (_ErrorReply, _HealthReply):  # OpenAI's error shape, then `/healthz`'s
        try:
            return reply.model_validate_json(response.content).message()
        except ValidationError:
            pass
    text = " ".join(response.text.split())[:300]
    return text or response.reason_phrase or f"HTTP {response.status_code}"
