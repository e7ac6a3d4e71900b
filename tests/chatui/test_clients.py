"""Backend clients over respx-mocked HTTP: SSE parsing, error mapping, closing the stream."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Sequence
from dataclasses import replace
from typing import Any

import httpx
import pytest
import respx

from chatui.clients import (
    BackendError,
    BackendHTTPError,
    BackendUnavailable,
    ChatClient,
    ChatOptions,
    Finished,
    InferClient,
    OpenAIClient,
    SSEDecoder,
    StreamInterrupted,
    TextDelta,
    ToolCalls,
    UnsupportedOption,
    Usage,
    create_client,
)
from chatui.settings import ChatUISettings
from chatui.tools import FunctionCall, ToolCall, ToolRequest

BASE = "http://backend.test"
CHAT = "/v1/chat/completions"
OPTIONS = ChatOptions(temperature=0.5, top_p=0.8, max_tokens=64)
HELLO = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}]
USAGE = {
    "prompt_tokens": 5,
    "completion_tokens": 3,
    "total_tokens": 8,
    "prompt_tokens_details": {"cached_tokens": 4},
}
# Multi-byte characters (2, 3 and 4 bytes in UTF-8) so that some splits fall inside one.
PIECES = ["Hé", "llo 世界", " 🌍!"]


def chunk(delta: dict[str, Any], finish_reason: str | None = None) -> dict[str, Any]:
    """One OpenAI stream chunk."""
    choice = {"index": 0, "delta": delta, "finish_reason": finish_reason}
    return {"id": "chatcmpl-1", "object": "chat.completion.chunk", "choices": [choice]}


def sse_body(*events: dict[str, Any] | str, newline: str = "\n") -> bytes:
    """Server-sent events as the backend frames them."""
    # ensure_ascii=False: raw UTF-8 on the wire, as servers send it, not \u escapes.
    payloads = [e if isinstance(e, str) else json.dumps(e, ensure_ascii=False) for e in events]
    return "".join(f"data: {p}{newline}{newline}" for p in payloads).encode()


def full_reply(newline: str = "\n") -> bytes:
    """Role chunk, content deltas, a keep-alive comment, finish, usage, [DONE]."""
    deltas = [chunk({"content": piece}) for piece in PIECES]
    return (
        sse_body(chunk({"role": "assistant", "content": ""}), *deltas[:2], newline=newline)
        + f": keep-alive{newline}{newline}".encode()
        + sse_body(
            deltas[2],
            chunk({}, "stop"),
            {"choices": [], "usage": USAGE},
            "[DONE]",
            newline=newline,
        )
    )


class ChunkedStream(httpx.AsyncByteStream):
    """A response body delivered in the given chunks, then optionally an error or a hang."""

    def __init__(
        self, chunks: Sequence[bytes], error: Exception | None = None, hang: bool = False
    ) -> None:
        self.chunks = chunks
        self.error = error
        self.hang = hang
        self.closed = False

    async def __aiter__(self) -> AsyncIterator[bytes]:
        for piece in self.chunks:
            yield piece
        if self.error is not None:
            raise self.error
        if self.hang:
            await asyncio.Event().wait()  # a backend that is still thinking

    async def aclose(self) -> None:
        self.closed = True


@pytest.fixture
def router() -> respx.Router:
    """Routes of the fake backend."""
    return respx.Router(base_url=BASE, assert_all_called=False)


def make_client(
    router: respx.Router, cls: type[ChatClient] = OpenAIClient, api_key: str | None = None
) -> ChatClient:
    """A client whose HTTP goes to `router`."""
    transport = httpx.MockTransport(router.async_handler)
    return cls(BASE, timeout=httpx.Timeout(1.0), api_key=api_key, transport=transport)


def stream_response(stream: ChunkedStream) -> httpx.Response:
    """A 200 event-stream response with `stream` as its body."""
    return httpx.Response(200, headers={"content-type": "text/event-stream"}, stream=stream)


async def collect(
    client: ChatClient, messages: list[dict[str, str]] = HELLO, options: ChatOptions = OPTIONS
) -> tuple[list[Any], BaseException | None]:
    """Every event of one reply, and the error that ended it, if any."""
    events: list[Any] = []
    try:
        async for event in client.stream_chat(messages, options):
            events.append(event)
    except BackendError as exc:
        return events, exc
    return events, None


def text(events: list[Any]) -> str:
    return "".join(e.text for e in events if isinstance(e, TextDelta))


async def test_stream_yields_deltas_then_finish_with_usage(router: respx.Router) -> None:
    route = router.post(CHAT).mock(return_value=stream_response(ChunkedStream([full_reply()])))
    events, error = await collect(make_client(router))
    assert error is None
    assert [e for e in events if isinstance(e, TextDelta)] == [TextDelta(p) for p in PIECES]
    assert events[-1] == Finished("stop", Usage(5, 3, 8, cached_tokens=4))
    sent = json.loads(route.calls.last.request.content)
    assert sent["messages"] == HELLO
    assert sent["stream"] is True and sent["stream_options"] == {"include_usage": True}
    assert (sent["temperature"], sent["top_p"], sent["max_tokens"]) == (0.5, 0.8, 64)
    assert "model" not in sent


async def test_json_output_asks_for_a_json_object_and_a_plain_chat_does_not(
    router: respx.Router,
) -> None:
    route = router.post(CHAT)
    route.side_effect = lambda _: stream_response(ChunkedStream([full_reply()]))
    client = make_client(router)
    await collect(client)
    plain = json.loads(route.calls.last.request.content)
    _, error = await collect(client, options=replace(OPTIONS, json_output=True))
    constrained = json.loads(route.calls.last.request.content)
    assert error is None
    # A plain chat's request is what it was before JSON output existed: no response_format.
    assert set(plain) == {
        "messages",
        "stream",
        "stream_options",
        "temperature",
        "top_p",
        "max_tokens",
    }
    assert constrained == {**plain, "response_format": {"type": "json_object"}}


WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {}}}
TOOLS = ToolRequest((WEATHER,), "required")
CALL = {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": ""}}


def tool_call(index: int, arguments: str, **fields: Any) -> dict[str, Any]:
    """One call of a stream chunk's `tool_calls`."""
    return {
        "index": index,
        **fields,
        "function": {**fields.get("function", {}), "arguments": arguments},
    }


@pytest.mark.parametrize("choice", ["auto", "required", "get_weather"])
async def test_tools_ask_for_a_call_and_a_plain_chat_does_not(
    router: respx.Router, choice: str
) -> None:
    route = router.post(CHAT)
    route.side_effect = lambda _: stream_response(ChunkedStream([full_reply()]))
    client = make_client(router)
    await collect(client)
    plain = json.loads(route.calls.last.request.content)
    await collect(client, options=replace(OPTIONS, tools=ToolRequest((WEATHER,), choice)))
    calling = json.loads(route.calls.last.request.content)
    named = {"type": "function", "function": {"name": "get_weather"}}
    assert "tools" not in plain and "tool_choice" not in plain
    assert calling == {
        **plain,
        "tools": [WEATHER],
        "tool_choice": choice if choice in ("auto", "required") else named,
    }


async def test_calls_sent_whole_in_one_delta_come_before_finished(router: respx.Router) -> None:
    # As this backend streams them: the role, then every call whole, then `tool_calls`.
    calls = [
        {"index": 0, **CALL, "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}},
        {
            "index": 1,
            "id": "call_2",
            "type": "function",
            "function": {"name": "get_time", "arguments": "{}"},
        },
    ]
    body = sse_body(
        chunk({"role": "assistant", "content": ""}),
        chunk({"tool_calls": calls}),
        chunk({}, "tool_calls"),
        {"choices": [], "usage": USAGE},
        "[DONE]",
    )
    router.post(CHAT).mock(return_value=stream_response(ChunkedStream([body])))
    events, error = await collect(make_client(router), options=replace(OPTIONS, tools=TOOLS))
    assert error is None
    assert events == [
        ToolCalls(
            (
                ToolCall(
                    id="call_1",
                    function=FunctionCall(name="get_weather", arguments='{"city": "Oslo"}'),
                ),
                ToolCall(id="call_2", function=FunctionCall(name="get_time", arguments="{}")),
            )
        ),
        Finished("tool_calls", Usage(5, 3, 8, cached_tokens=4)),
    ]


async def test_calls_streamed_in_pieces_are_put_together(router: respx.Router) -> None:
    # As OpenAI streams them: id and name first, then the arguments in pieces, calls interleaved.
    body = sse_body(
        chunk({"role": "assistant", "tool_calls": [tool_call(0, "", **CALL)]}),
        chunk({"tool_calls": [tool_call(0, '{"ci')]}),
        chunk({"tool_calls": [tool_call(1, "", id="call_2", function={"name": "get_time"})]}),
        chunk({"tool_calls": [tool_call(0, 'ty": "Oslo"}'), tool_call(1, "{}")]}),
        chunk({}, "tool_calls"),
        "[DONE]",
    )
    router.post(CHAT).mock(return_value=stream_response(ChunkedStream([body])))
    events, error = await collect(make_client(router), options=replace(OPTIONS, tools=TOOLS))
    assert error is None and isinstance(events[0], ToolCalls)
    assert [(c.id, c.function.name, c.function.arguments) for c in events[0].calls] == [
        ("call_1", "get_weather", '{"city": "Oslo"}'),
        ("call_2", "get_time", "{}"),
    ]


async def test_a_call_without_an_id_is_an_interruption(router: respx.Router) -> None:
    named = tool_call(0, "{}", function={"name": "get_weather"})
    body = sse_body(chunk({"tool_calls": [named]}), chunk({}, "tool_calls"), "[DONE]")
    router.post(CHAT).mock(return_value=stream_response(ChunkedStream([body])))
    events, error = await collect(make_client(router), options=replace(OPTIONS, tools=TOOLS))
    assert events == [] and isinstance(error, StreamInterrupted)
    assert "a tool call without an id or a name" in str(error)


async def test_a_cut_after_a_call_began_interrupts_the_reply(router: respx.Router) -> None:
    body = sse_body(chunk({"tool_calls": [tool_call(0, '{"ci', **CALL)]}))
    stream = ChunkedStream([body], error=httpx.ReadError("reset"))
    router.post(CHAT).mock(return_value=stream_response(stream))
    events, error = await collect(make_client(router), options=replace(OPTIONS, tools=TOOLS))
    assert events == [] and isinstance(error, StreamInterrupted) and stream.closed


@pytest.mark.parametrize("newline", ["\n", "\r\n", "\r"])
async def test_every_split_point_gives_the_same_reply(router: respx.Router, newline: str) -> None:
    body = full_reply(newline)
    for cut in range(len(body) + 1):
        stream = ChunkedStream([body[:cut], body[cut:]])
        router.post(CHAT).mock(return_value=stream_response(stream))
        events, error = await collect(make_client(router))
        assert error is None, cut
        assert text(events) == "".join(PIECES), cut
        assert events[-1] == Finished("stop", Usage(5, 3, 8, cached_tokens=4)), cut


async def test_one_byte_at_a_time(router: respx.Router) -> None:
    body = full_reply("\r\n")
    stream = ChunkedStream([body[i : i + 1] for i in range(len(body))])
    router.post(CHAT).mock(return_value=stream_response(stream))
    events, error = await collect(make_client(router))
    assert (error, text(events)) == (None, "".join(PIECES))


def test_sse_decoder_joins_data_lines_ignores_comments_and_other_fields() -> None:
    decoder = SSEDecoder()
    payloads = decoder.feed(b": ping\nevent: x\nid: 7\ndata: a\ndata:b\n\n\n: ping\n\n")
    assert payloads == ["a\nb"]


def test_sse_decoder_waits_for_the_lf_of_a_crlf_split_across_chunks() -> None:
    decoder = SSEDecoder()
    assert decoder.feed(b"data: a\r") == []
    assert decoder.feed(b"\ndata: b\r\n\r\n") == ["a\nb"]


def test_sse_decoder_drops_an_event_cut_before_its_blank_line() -> None:
    decoder = SSEDecoder()
    assert decoder.feed(b'data: {"choices": []}\n') == []
    assert decoder.feed(b"") == []


async def test_stream_cut_without_done_delivers_partial_text_then_interrupts(
    router: respx.Router,
) -> None:
    body = sse_body(chunk({"content": "Hel"}), chunk({"content": "lo"}))
    stream = ChunkedStream([body])
    router.post(CHAT).mock(return_value=stream_response(stream))
    events, error = await collect(make_client(router))
    assert text(events) == "Hello"
    assert isinstance(error, StreamInterrupted)
    assert stream.closed


async def test_done_before_finish_reason_is_an_interruption(router: respx.Router) -> None:
    body = sse_body(chunk({"content": "Hel"}), "[DONE]")
    router.post(CHAT).mock(return_value=stream_response(ChunkedStream([body])))
    events, error = await collect(make_client(router))
    assert text(events) == "Hel" and isinstance(error, StreamInterrupted)


async def test_finish_reason_then_eof_without_done_is_complete(router: respx.Router) -> None:
    body = sse_body(chunk({"content": "Hi"}), chunk({}, "length"))
    router.post(CHAT).mock(return_value=stream_response(ChunkedStream([body])))
    events, error = await collect(make_client(router))
    assert error is None and events == [TextDelta("Hi"), Finished("length", None)]


async def test_error_event_mid_stream_carries_the_server_message(router: respx.Router) -> None:
    error_event = {"error": {"message": "engine exploded", "type": "internal_error"}}
    body = sse_body(chunk({"content": "Par"}), error_event, "[DONE]")
    router.post(CHAT).mock(return_value=stream_response(ChunkedStream([body])))
    events, error = await collect(make_client(router))
    assert text(events) == "Par"
    assert isinstance(error, StreamInterrupted) and "engine exploded" in str(error)


async def test_unreadable_event_is_an_interruption(router: respx.Router) -> None:
    body = sse_body(chunk({"content": "a"})) + b"data: {not json\n\n"
    router.post(CHAT).mock(return_value=stream_response(ChunkedStream([body])))
    events, error = await collect(make_client(router))
    assert text(events) == "a" and isinstance(error, StreamInterrupted)


async def test_done_stops_reading_and_closes_the_response(router: respx.Router) -> None:
    stream = ChunkedStream([sse_body(chunk({"content": "a"}, "stop"), "[DONE]")], hang=True)
    router.post(CHAT).mock(return_value=stream_response(stream))
    events, error = await asyncio.wait_for(collect(make_client(router)), timeout=5)
    assert error is None and events[-1] == Finished("stop", None)
    assert stream.closed


TRANSPORT_ERRORS = [
    httpx.ConnectError("connection refused"),
    httpx.ConnectTimeout("connect timeout"),
    httpx.ReadTimeout("read timeout"),
    httpx.PoolTimeout("pool timeout"),
    httpx.ReadError("reset"),
    httpx.RemoteProtocolError("peer closed connection"),
]


@pytest.mark.parametrize("exc", TRANSPORT_ERRORS, ids=lambda e: type(e).__name__)
async def test_transport_errors_before_the_reply_are_backend_unavailable(
    router: respx.Router, exc: Exception
) -> None:
    router.post(CHAT).mock(side_effect=exc)
    events, error = await collect(make_client(router))
    assert events == []
    assert isinstance(error, BackendUnavailable) and error.__cause__ is exc
    assert BASE in str(error)


@pytest.mark.parametrize("exc", TRANSPORT_ERRORS, ids=lambda e: type(e).__name__)
async def test_transport_errors_after_some_text_interrupt_the_stream(
    router: respx.Router, exc: Exception
) -> None:
    stream = ChunkedStream([sse_body(chunk({"content": "par"}))], error=exc)
    router.post(CHAT).mock(return_value=stream_response(stream))
    events, error = await collect(make_client(router))
    assert text(events) == "par"
    assert isinstance(error, StreamInterrupted) and error.__cause__ is exc
    assert stream.closed


async def test_read_timeout_before_the_first_token_is_backend_unavailable(
    router: respx.Router,
) -> None:
    stream = ChunkedStream([b": keep-alive\n\n"], error=httpx.ReadTimeout("slow"))
    router.post(CHAT).mock(return_value=stream_response(stream))
    _, error = await collect(make_client(router))
    assert isinstance(error, BackendUnavailable)


@pytest.mark.parametrize("status", [400, 404, 500, 503])
async def test_http_errors_carry_the_openai_error_message(
    router: respx.Router, status: int
) -> None:
    body = {"error": {"message": f"problem {status}", "type": "x", "param": None, "code": None}}
    router.post(CHAT).mock(return_value=httpx.Response(status, json=body))
    _, error = await collect(make_client(router))
    assert isinstance(error, BackendHTTPError)
    message = f"problem {status}"
    assert (error.status_code, error.message, str(error)) == (status, message, message)


async def test_non_json_error_body_gives_the_text_and_status(router: respx.Router) -> None:
    html = "<html><body><h1>502 Bad Gateway</h1>\n</body></html>"
    router.post(CHAT).mock(return_value=httpx.Response(502, text=html))
    _, error = await collect(make_client(router))
    assert isinstance(error, BackendHTTPError) and error.status_code == 502
    assert "502 Bad Gateway" in error.message and "\n" not in error.message


async def test_empty_error_body_falls_back_to_the_reason_phrase(router: respx.Router) -> None:
    router.post(CHAT).mock(return_value=httpx.Response(504))
    _, error = await collect(make_client(router))
    assert isinstance(error, BackendHTTPError) and error.message == "Gateway Timeout"


async def test_closing_the_generator_early_closes_the_http_stream(router: respx.Router) -> None:
    stream = ChunkedStream([sse_body(chunk({"content": "first"}))], hang=True)
    router.post(CHAT).mock(return_value=stream_response(stream))
    events = make_client(router).stream_chat(HELLO, OPTIONS)
    assert await anext(events) == TextDelta("first")
    await events.aclose()  # what `aclosing` does when the Stop button ends the callback
    assert stream.closed


async def test_cancelling_the_consumer_task_closes_the_http_stream(router: respx.Router) -> None:
    stream = ChunkedStream([sse_body(chunk({"content": "first"}))], hang=True)
    router.post(CHAT).mock(return_value=stream_response(stream))
    received: list[Any] = []

    async def consume() -> None:
        async for event in make_client(router).stream_chat(HELLO, OPTIONS):
            received.append(event)

    task = asyncio.create_task(consume())
    while not received:
        await asyncio.sleep(0.01)
    task.cancel()  # what Gradio does to a cancelled event
    with pytest.raises(asyncio.CancelledError):
        await task
    assert stream.closed


async def test_api_key_is_sent_as_a_bearer_token(router: respx.Router) -> None:
    route = router.post(CHAT).mock(return_value=stream_response(ChunkedStream([full_reply()])))
    await collect(make_client(router, api_key="s3cret"))
    assert route.calls.last.request.headers["authorization"] == "Bearer s3cret"


async def test_the_key_from_settings_goes_with_every_request_health_included(
    router: respx.Router,
) -> None:
    models = {"object": "list", "data": [{"id": "m"}]}
    routes = [
        router.get("/v1/models").mock(return_value=httpx.Response(200, json=models)),
        router.post(CHAT).mock(return_value=stream_response(ChunkedStream([full_reply()]))),
        router.get("/healthz").mock(return_value=httpx.Response(200, json={"model": "m"})),
        router.get("/infer").mock(return_value=httpx.Response(200, json=["hi"])),
    ]
    transport = httpx.MockTransport(router.async_handler)
    for api in ("openai", "infer"):
        settings = ChatUISettings(backend_url=BASE, backend_api=api, api_key="k-from-env")
        client = create_client(settings, transport=transport)
        assert (await client.health()).state == "ready"
        await collect(client)
    for route in routes:
        assert route.called
        assert {c.request.headers["authorization"] for c in route.calls} == {"Bearer k-from-env"}


async def test_a_refused_key_is_an_http_401_with_the_servers_message(router: respx.Router) -> None:
    refusal = {
        "error": {
            "message": "Invalid API key.",
            "type": "invalid_request_error",
            "param": None,
            "code": "invalid_api_key",
        }
    }
    router.post(CHAT).mock(return_value=httpx.Response(401, json=refusal))
    router.get("/v1/models").mock(return_value=httpx.Response(401, json=refusal))
    client = make_client(router, api_key="wrong")
    _, error = await collect(client)
    assert isinstance(error, BackendHTTPError)
    assert (error.status_code, error.message) == (401, "Invalid API key.")
    status = await client.health()
    assert status.state == "unreachable" and "HTTP 401: Invalid API key." in status.detail


async def test_health_ready_reports_model_and_window_and_later_chats_name_it(
    router: respx.Router,
) -> None:
    models = {"object": "list", "data": [{"id": "mistral-7b", "max_model_len": 8192}]}
    router.get("/v1/models").mock(return_value=httpx.Response(200, json=models))
    route = router.post(CHAT).mock(return_value=stream_response(ChunkedStream([full_reply()])))
    client = make_client(router)
    status = await client.health()
    assert (status.state, status.model, status.context_window) == ("ready", "mistral-7b", 8192)
    await collect(client)
    assert json.loads(route.calls.last.request.content)["model"] == "mistral-7b"


async def test_health_without_max_model_len_leaves_the_window_unknown(
    router: respx.Router,
) -> None:
    router.get("/v1/models").mock(return_value=httpx.Response(200, json={"data": [{"id": "m"}]}))
    status = await make_client(router).health()
    assert (status.state, status.model, status.context_window) == ("ready", "m", None)


@pytest.mark.parametrize(
    ("response", "state"),
    [
        (httpx.Response(503, json={"error": {"message": "The model is still loading"}}), "loading"),
        (httpx.Response(500, json={"error": {"message": "boom"}}), "unreachable"),
        (httpx.ConnectError("refused"), "unreachable"),
        (httpx.ReadTimeout("slow"), "unreachable"),
    ],
)
async def test_health_states(
    router: respx.Router, response: httpx.Response | Exception, state: str
) -> None:
    route = router.get("/v1/models")
    if isinstance(response, Exception):
        route.mock(side_effect=response)
    else:
        route.mock(return_value=response)
    status = await make_client(router).health()
    assert status.state == state and status.model is None and status.detail


async def test_infer_client_sends_only_the_last_user_message(router: respx.Router) -> None:
    route = router.get("/infer").mock(return_value=httpx.Response(200, json=["Paris."]))
    messages = [*HELLO, {"role": "assistant", "content": "Hello!"}]
    messages.append({"role": "user", "content": "Capital of France?"})
    events, error = await collect(make_client(router, InferClient), messages)
    assert error is None
    assert events == [TextDelta("Paris."), Finished("stop", None)]
    assert route.calls.last.request.url.params["sentence"] == "Capital of France?"


@pytest.mark.parametrize("body", [{"reply": "x"}, ["a", "b"], [1]])
async def test_infer_client_rejects_an_unexpected_reply(router: respx.Router, body: Any) -> None:
    router.get("/infer").mock(return_value=httpx.Response(200, json=body))
    _, error = await collect(make_client(router, InferClient))
    assert isinstance(error, StreamInterrupted)


async def test_infer_client_refuses_json_output_before_any_request(router: respx.Router) -> None:
    route = router.get("/infer").mock(return_value=httpx.Response(200, json=["{}"]))
    client = make_client(router, InferClient)
    events, error = await collect(client, options=replace(OPTIONS, json_output=True))
    assert events == [] and isinstance(error, UnsupportedOption)
    assert "CHATUI_BACKEND_API=openai" in str(error) and "JSON" in str(error)
    assert not route.called


async def test_infer_client_refuses_tools_before_any_request(router: respx.Router) -> None:
    route = router.get("/infer").mock(return_value=httpx.Response(200, json=["{}"]))
    client = make_client(router, InferClient)
    events, error = await collect(client, options=replace(OPTIONS, tools=TOOLS))
    assert events == [] and isinstance(error, UnsupportedOption)
    assert str(error).startswith("Tools needs the OpenAI API (CHATUI_BACKEND_API=openai)")
    assert not route.called


async def test_infer_client_maps_http_and_transport_errors(router: respx.Router) -> None:
    body = {"error": {"message": "The query parameter 'sentence' is required."}}
    router.get("/infer").mock(return_value=httpx.Response(400, json=body))
    _, error = await collect(make_client(router, InferClient))
    assert isinstance(error, BackendHTTPError) and "sentence" in error.message
    router.get("/infer").mock(side_effect=httpx.ConnectError("refused"))
    _, error = await collect(make_client(router, InferClient))
    assert isinstance(error, BackendUnavailable)


@pytest.mark.parametrize(
    ("response", "expected"),
    [
        (httpx.Response(200, json={"status": "ok", "model": "m"}), ("ready", "m")),
        (httpx.Response(404, json={"detail": "Not Found"}), ("ready", None)),
        (httpx.Response(503, json={"status": "loading"}), ("loading", None)),
        (httpx.Response(500, text="oops"), ("unreachable", None)),
    ],
)
async def test_infer_client_health(
    router: respx.Router, response: httpx.Response, expected: tuple[str, str | None]
) -> None:
    router.get("/healthz").mock(return_value=response)
    status = await make_client(router, InferClient).health()
    assert (status.state, status.model) == expected


async def test_health_reports_why_the_backend_is_not_ready(router: respx.Router) -> None:
    why = "No model replica is running; Ray Serve is replacing it."
    unavailable = httpx.Response(503, json={"status": "unavailable", "error": why})
    router.get("/healthz").mock(return_value=unavailable)
    status = await make_client(router, InferClient).health()
    assert (status.state, status.detail) == ("loading", why)


@pytest.mark.parametrize(("api", "cls"), [("openai", OpenAIClient), ("infer", InferClient)])
def test_create_client_picks_the_configured_api(api: str, cls: type[ChatClient]) -> None:
    client = create_client(ChatUISettings(backend_api=api, backend_url="http://b:1/"))
    assert type(client) is cls and client.base_url == "http://b:1"


async def test_a_redirect_is_reported_not_followed(router: respx.Router) -> None:
    moved = httpx.Response(301, headers={"location": "https://elsewhere.test/"})
    router.post(CHAT).mock(return_value=moved)
    _, error = await collect(make_client(router))
    assert isinstance(error, BackendHTTPError) and error.status_code == 301
