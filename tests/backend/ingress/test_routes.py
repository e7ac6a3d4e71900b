"""The HTTP routes, over the real model server with a scripted engine."""

from __future__ import annotations

import hmac
import logging
from collections.abc import AsyncIterator

import httpx
import pytest
from pydantic import SecretStr

from backend.errors import EngineError
from backend.ingress.routes import build_api
from backend.replica.model_server import ModelServer
from backend.settings import BackendSettings
from backend.tool_formats import HERMES
from tests.fakes import Script
from tests.sse import sse_payloads

CHAT = "/v1/chat/completions"
HELLO = [{"role": "user", "content": "hello there"}]


async def test_non_streaming_reply_has_text_finish_reason_and_usage(
    client: httpx.AsyncClient, script: Script
) -> None:
    script.enqueue(["Hel", "lo", "!"])
    response = await client.post(CHAT, json={"messages": HELLO})
    assert response.status_code == 200
    body = response.json()
    assert body["object"] == "chat.completion"
    assert body["model"] == "scripted-model"
    assert body["choices"][0]["message"] == {"role": "assistant", "content": "Hello!"}
    assert body["choices"][0]["finish_reason"] == "stop"
    assert body["usage"] == {
        "prompt_tokens": 2,
        "completion_tokens": 3,
        "total_tokens": 5,
        "prompt_tokens_details": {"cached_tokens": 0},
    }


async def test_stream_order_role_deltas_finish_usage_done(
    client: httpx.AsyncClient, script: Script
) -> None:
    script.enqueue(["a", "b"])
    request = {"messages": HELLO, "stream": True, "stream_options": {"include_usage": True}}
    response = await client.post(CHAT, json=request)
    assert response.headers["content-type"].startswith("text/event-stream")
    events = sse_payloads(response.text)
    assert events[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert [e["choices"][0]["delta"].get("content") for e in events[1:3]] == ["a", "b"]
    last = {"index": 0, "delta": {}, "finish_reason": "stop", "logprobs": None}  # as OpenAI
    assert events[3]["choices"][0] == last
    assert events[4]["choices"] == [] and events[4]["usage"]["completion_tokens"] == 2
    assert events[5] == "[DONE]"
    assert len({e["id"] for e in events[:5]}) == 1


async def test_stream_without_usage_option_sends_no_usage_chunk(
    client: httpx.AsyncClient, script: Script
) -> None:
    script.enqueue(["x"])
    response = await client.post(CHAT, json={"messages": HELLO, "stream": True})
    events = sse_payloads(response.text)
    assert all("usage" not in e for e in events[:-1])
    assert events[-2]["choices"][0]["finish_reason"] == "stop"


@pytest.mark.parametrize("field", ["functions", "audio", "function_call", "prediction"])
async def test_a_field_this_server_does_not_honour_is_a_400_naming_it(
    client: httpx.AsyncClient, script: Script, field: str
) -> None:
    response = await client.post(CHAT, json={"messages": HELLO, field: {"x": 1}})
    error = response.json()["error"]
    assert response.status_code == 400 and error["param"] == field
    assert error["code"] == "unsupported_parameter" and script.history == []


async def test_fields_that_cannot_change_the_reply_are_accepted(client: httpx.AsyncClient) -> None:
    harmless = {"user": "u1", "metadata": {"k": "v"}, "store": False, "service_tier": "auto"}
    response = await client.post(CHAT, json={"messages": HELLO, **harmless})
    assert response.status_code == 200
    as_open_webui_sends_it = {"name": "Ada", "id": "u1", "email": "a@b.c", "role": "user"}
    response = await client.post(CHAT, json={"messages": HELLO, "user": as_open_webui_sends_it})
    assert response.status_code == 200


@pytest.mark.parametrize(
    "part",
    [
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}},
        {"type": "input_audio", "input_audio": {"data": "AAAA", "format": "wav"}},
        {"type": "file", "file": {"file_id": "f1"}},
        {"type": "text", "text": "hi", "image_url": {"url": "data:image/png;base64,AAAA"}},
    ],
)
async def test_a_part_of_another_modality_is_a_400_that_says_so(
    client: httpx.AsyncClient, script: Script, part: dict[str, object]
) -> None:
    content = [{"type": "text", "text": "What is this?"}, part]
    response = await client.post(CHAT, json={"messages": [{"role": "user", "content": content}]})
    error = response.json()["error"]
    assert response.status_code == 400 and error["param"] == "messages.0.content.1"
    kind = "image_url" if "image_url" in part else part["type"]
    assert f"reads text only: {kind} parts" in error["message"] and script.history == []


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"top_logprobs": 3}, None),  # without logprobs
        ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
        ({"logit_bias": {"5": 101}}, "logit_bias.5"),
        ({"response_format": {"type": "json_schema"}}, "response_format"),
        ({"response_format": {"type": "yaml"}}, "response_format.type"),
        ({"presence_penalty": 2.5}, "presence_penalty"),
    ],
)
async def test_sampling_fields_out_of_range_are_a_400(
    client: httpx.AsyncClient, body: dict[str, object], param: str | None
) -> None:
    response = await client.post(CHAT, json={"messages": HELLO, **body})
    assert response.status_code == 400
    assert response.json()["error"]["param"] == param


async def test_a_schema_that_cannot_be_compiled_is_a_400_before_generating(
    client: httpx.AsyncClient, script: Script
) -> None:
    bad = {"type": "json_schema", "json_schema": {"name": "x", "schema": {"$ref": "#/nowhere"}}}
    response = await client.post(CHAT, json={"messages": HELLO, "response_format": bad})
    assert response.status_code == 400 and response.json()["error"]["param"] == "response_format"
    assert script.history == []


async def test_a_stream_the_engine_cannot_take_is_a_503_before_any_byte(
    client: httpx.AsyncClient, script: Script
) -> None:
    script.broken = "The batching loop has stopped."
    response = await client.post(CHAT, json={"messages": HELLO, "stream": True})
    assert response.status_code == 503 and response.headers["retry-after"]
    assert "batching loop has stopped" in response.json()["error"]["message"]
    assert script.history == []  # never reached the engine


async def test_error_mid_stream_is_an_error_event_then_done(
    client: httpx.AsyncClient, script: Script
) -> None:
    script.enqueue(["partial", EngineError("kernel exploded")])
    response = await client.post(CHAT, json={"messages": HELLO, "stream": True})
    assert response.status_code == 200  # the stream had started
    events = sse_payloads(response.text)
    assert events[1]["choices"][0]["delta"]["content"] == "partial"
    assert events[-2]["error"]["message"] == "kernel exploded"
    assert events[-2]["error"]["type"] == "internal_error"
    assert events[-1] == "[DONE]"


async def test_sampling_parameters_reach_the_engine(
    client: httpx.AsyncClient, script: Script
) -> None:
    request = {
        "messages": HELLO,
        "max_tokens": 7,
        "temperature": 0.2,
        "top_p": 0.5,
        "stop": ["END"],
        "seed": 42,
    }
    await client.post(CHAT, json=request)
    params = script.history[-1][1]
    assert (params.max_tokens, params.temperature, params.top_p) == (7, 0.2, 0.5)
    assert (params.stop, params.seed) == (("END",), 42)


async def test_max_tokens_defaults_to_setting_and_length_finish(
    client: httpx.AsyncClient, script: Script
) -> None:
    script.enqueue(["w"] * 40)
    body = (await client.post(CHAT, json={"messages": HELLO})).json()
    assert body["usage"]["completion_tokens"] == 16
    assert body["choices"][0]["finish_reason"] == "length"


async def test_whole_conversation_reaches_the_engine(
    client: httpx.AsyncClient, script: Script
) -> None:
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "My name is Ada."},
        {"role": "assistant", "content": "Hi Ada."},
        {"role": "user", "content": [{"type": "text", "text": "What is my name?"}]},
    ]
    await client.post(CHAT, json={"messages": messages})
    seen = script.history[-1][0]
    assert [m["role"] for m in seen] == ["system", "user", "assistant", "user"]
    assert seen[1]["content"] == "My name is Ada." and seen[3]["content"] == "What is my name?"


async def test_sampling_fields_reach_the_engine(client: httpx.AsyncClient, script: Script) -> None:
    body = {"messages": HELLO, "temperature": 0, "seed": 7, "stop": "x", "ignore_eos": True}
    await client.post(CHAT, json=body)
    params = script.history[-1][1]
    assert (params.temperature, params.seed, params.stop, params.ignore_eos) == (0, 7, ("x",), True)


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({}, "messages"),
        ({"messages": []}, "messages"),
        ({"messages": [{"role": "robot", "content": "x"}]}, "messages.0.role"),
        ({"messages": [{"role": "user", "content": 5}]}, "messages.0.content"),
        ({"messages": [{"role": "user", "content": {"a": 1}}]}, "messages.0.content"),
        ({"messages": [{"role": "user"}]}, "messages.0"),  # content is required
        ({"messages": HELLO, "n": 9}, "n"),  # above LLM_MAX_CHOICES
        ({"messages": HELLO, "n": 129}, "n"),  # above OpenAI's bound
        ({"messages": HELLO, "n": 0}, "n"),
        ({"messages": HELLO, "max_tokens": 0}, "max_tokens"),
        ({"messages": HELLO, "max_tokens": -3}, "max_tokens"),
        ({"messages": HELLO, "max_tokens": 33}, "max_tokens"),
        ({"messages": HELLO, "temperature": 2.5}, "temperature"),
        ({"messages": HELLO, "temperature": -0.1}, "temperature"),
        ({"messages": HELLO, "top_p": 0}, "top_p"),
        ({"messages": HELLO, "stop": ["a", "b", "c", "d", "e"]}, "stop"),
        ({"messages": [{"role": "user", "content": "word " * 70}]}, "messages"),
        ({"messages": [{"role": "user", "content": "word " * 60}], "max_tokens": 10}, "messages"),
    ],
)
async def test_bad_request_is_400_naming_the_field_then_service_still_answers(
    client: httpx.AsyncClient, body: dict, param: str
) -> None:
    response = await client.post(CHAT, json=body)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error"
    assert error["param"] == param
    assert error["message"]
    assert (await client.post(CHAT, json={"messages": HELLO})).status_code == 200


async def test_too_long_prompt_says_context_length(client: httpx.AsyncClient) -> None:
    response = await client.post(CHAT, json={"messages": [{"role": "user", "content": "w " * 70}]})
    error = response.json()["error"]
    assert error["code"] == "context_length_exceeded"
    assert "maximum context length is 64 tokens" in error["message"]


@pytest.mark.parametrize("raw", [b"{not json", b"[1, 2]", b"\xff\xfe", b""])
async def test_malformed_json_is_400(client: httpx.AsyncClient, raw: bytes) -> None:
    response = await client.post(CHAT, content=raw, headers={"content-type": "application/json"})
    assert response.status_code == 400
    assert response.json()["error"]["type"] == "invalid_request_error"


async def test_body_over_limit_is_413_then_service_still_answers(client: httpx.AsyncClient) -> None:
    big = {"messages": [{"role": "user", "content": "x" * 5000}]}
    response = await client.post(CHAT, json=big)
    assert response.status_code == 413
    assert "4096 bytes" in response.json()["error"]["message"]
    assert (await client.post(CHAT, json={"messages": HELLO})).status_code == 200


async def test_unknown_model_is_404(client: httpx.AsyncClient) -> None:
    response = await client.post(CHAT, json={"messages": HELLO, "model": "gpt-9"})
    assert response.status_code == 404
    assert response.json()["error"]["code"] == "model_not_found"


async def test_models_and_health(client: httpx.AsyncClient) -> None:
    models = (await client.get("/v1/models")).json()
    assert models["data"][0]["id"] == "scripted-model"
    assert models["data"][0]["max_model_len"] == 64
    health = await client.get("/healthz")
    assert health.status_code == 200 and health.json()["status"] == "ok"


async def test_infer_returns_reply_only(client: httpx.AsyncClient, script: Script) -> None:
    script.enqueue(["Paris", "."])
    response = await client.get("/infer", params={"sentence": "Capital of France?"})
    assert response.json() == ["Paris."]
    assert script.history[-1][0] == [{"role": "user", "content": "Capital of France?"}]


async def test_infer_without_sentence_is_400(client: httpx.AsyncClient) -> None:
    response = await client.get("/infer")
    assert response.status_code == 400
    assert response.json()["error"]["param"] == "sentence"


async def test_unknown_route_is_404_in_openai_shape(client: httpx.AsyncClient) -> None:
    response = await client.get("/v1/nothing")
    assert response.status_code == 404
    assert response.json()["error"]["type"] == "not_found_error"


async def test_an_unexpected_failure_is_a_json_500_and_its_traceback_is_logged(
    server: ModelServer, settings: BackendSettings, script: Script, caplog: pytest.LogCaptureFixture
) -> None:
    script.enqueue(["partial", RuntimeError("boom at /srv/secret.py")])
    # As a server would: the app's response reaches the client, the exception is only logged.
    transport = httpx.ASGITransport(app=build_api(server, settings), raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://backend") as http:
        response = await http.post(CHAT, json={"messages": HELLO})
    assert response.status_code == 500
    error = response.json()["error"]
    assert error["type"] == "internal_error" and "secret" not in error["message"]
    [logged] = [r for r in caplog.records if r.name == "backend.ingress.routes"]
    assert logged.exc_info is not None  # the operator gets where it failed
    assert "boom at /srv/secret.py" in caplog.text and "Traceback" in caplog.text


# --- bearer keys (LLM_API_KEY) --------------------------------------------------------------

KEYS = ("first-key-3f9a1c", "second-key-77b2e0")
LOCKED_ROUTES = [
    ("POST", CHAT),
    ("POST", "/v1/completions"),
    ("POST", "/tokenize"),
    ("POST", "/detokenize"),
    ("GET", "/v1/models"),
    ("GET", "/infer?sentence=hi"),
    ("GET", "/v1/nothing"),
    ("GET", "/openapi.json"),
    ("GET", "/docs"),
]


@pytest.fixture
async def locked(
    server: ModelServer, settings: BackendSettings
) -> AsyncIterator[httpx.AsyncClient]:
    """The routes with two keys set, as `LLM_API_KEY="k1, k2"` sets them."""
    keyed = settings.model_copy(update={"api_key": SecretStr(f" {KEYS[0]} , {KEYS[1]},")})
    transport = httpx.ASGITransport(app=build_api(server, keyed))
    async with httpx.AsyncClient(transport=transport, base_url="http://backend") as http:
        yield http


def _bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def _assert_401(response: httpx.Response) -> None:
    assert response.status_code == 401, response.text
    assert response.headers["www-authenticate"] == "Bearer"
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert (error["type"], error["code"]) == ("invalid_request_error", "invalid_api_key")


@pytest.mark.parametrize(("method", "path"), LOCKED_ROUTES)
@pytest.mark.parametrize(
    "headers",
    [
        {},
        _bearer("not-a-key"),
        _bearer(KEYS[0][:-1]),  # a prefix of a real key
        _bearer(""),
        {"Authorization": f"Basic {KEYS[0]}"},  # a key under another scheme
        {"Authorization": KEYS[0]},
    ],
    ids=["none", "wrong", "prefix", "empty", "basic", "no-scheme"],
)
async def test_without_a_valid_key_every_route_but_health_is_401(
    locked: httpx.AsyncClient, script: Script, method: str, path: str, headers: dict[str, str]
) -> None:
    body = {"json": {"messages": HELLO}} if method == "POST" else {}
    _assert_401(await locked.request(method, path, headers=headers, **body))
    assert script.history == []  # refused before the engine saw anything


@pytest.mark.parametrize("key", KEYS)
async def test_each_configured_key_opens_every_route(
    locked: httpx.AsyncClient, script: Script, key: str
) -> None:
    script.enqueue(["Hi", "!"])
    chat = await locked.post(CHAT, json={"messages": HELLO}, headers=_bearer(key))
    assert chat.status_code == 200
    assert chat.json()["choices"][0]["message"]["content"] == "Hi!"
    assert (await locked.get("/v1/models", headers=_bearer(key))).status_code == 200
    stream = await locked.post(CHAT, json={"messages": HELLO, "stream": True}, headers=_bearer(key))
    assert sse_payloads(stream.text)[-1] == "[DONE]"
    # The scheme is case-insensitive (RFC 7235).
    lower = await locked.get("/v1/models", headers={"Authorization": f"bearer {key}"})
    assert lower.status_code == 200


async def test_health_needs_no_key(locked: httpx.AsyncClient) -> None:
    response = await locked.get("/healthz")
    assert response.status_code == 200 and response.json()["status"] == "ok"
    assert (await locked.get("/health")).status_code == 200  # vLLM's, for benchmark clients


async def test_keys_are_compared_in_full_against_every_key(
    locked: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No early exit on a match: the time taken does not tell which key matched."""
    calls: list[tuple[bytes, bytes]] = []
    real = hmac.compare_digest

    def compare(a: bytes, b: bytes) -> bool:
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr("backend.ingress.auth.hmac.compare_digest", compare)
    assert (await locked.get("/v1/models", headers=_bearer(KEYS[0]))).status_code == 200
    assert len(calls) == len(KEYS)
    assert all(len(a) == len(b) == 32 for a, b in calls)  # digests: equal length, whatever the key


async def test_keys_never_appear_in_responses_or_logs(
    locked: httpx.AsyncClient, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    replies = [
        await locked.get("/v1/models", headers=_bearer("wrong-key-5d1e")),
        await locked.post(CHAT, json={"messages": HELLO}, headers=_bearer(KEYS[1][:-2])),
        await locked.get("/v1/models", headers=_bearer(KEYS[0])),
    ]
    seen = caplog.text + "".join(r.text + str(r.headers) for r in replies)
    for secret in (*KEYS, "wrong-key-5d1e", KEYS[1][:-2]):
        assert secret not in seen


def test_settings_do_not_show_the_keys() -> None:
    settings = BackendSettings(api_key=",".join(KEYS))
    shown = repr(settings) + str(settings) + str(settings.model_dump())
    assert settings.api_keys() == KEYS
    assert not any(key in shown for key in KEYS)


# --- legacy completions, tokenizer routes, vLLM's health -------------------------------------


async def test_a_text_completion_continues_the_prompt_without_a_template(
    client: httpx.AsyncClient, script: Script
) -> None:
    script.enqueue(["a", "b"])
    response = await client.post("/v1/completions", json={"prompt": "Once upon", "max_tokens": 5})
    reply = response.json()
    assert response.status_code == 200 and reply["object"] == "text_completion"
    assert reply["choices"][0]["text"] == "ab" and reply["choices"][0]["finish_reason"] == "stop"
    assert reply["usage"]["prompt_tokens"] == 2  # the scripted engine: one id per word
    assert script.history[-1][0] == [{"role": "prompt", "content": "Once upon"}]  # no template


async def test_a_streamed_text_completion_ends_with_usage_and_done(
    client: httpx.AsyncClient, script: Script
) -> None:
    script.enqueue(["a", "b"])
    body = {"prompt": ["Hi"], "stream": True, "stream_options": {"include_usage": True}}
    events = sse_payloads((await client.post("/v1/completions", json=body)).text)
    assert [e["choices"][0]["text"] for e in events[:2]] == ["a", "b"]
    assert events[1]["choices"][0]["finish_reason"] == "stop"
    assert events[2]["choices"] == [] and events[2]["usage"]["completion_tokens"] == 2
    assert events[3] == "[DONE]" and {e["object"] for e in events[:3]} == {"text_completion"}


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"prompt": ["a", "b"]}, "prompt"),
        ({"prompt": "a", "echo": True}, "echo"),
        ({"prompt": "a", "logprobs": 2}, "logprobs"),
        ({"prompt": "a", "suffix": "z"}, "suffix"),
        ({"prompt": "a", "tools": []}, "tools"),  # chat only
        ({"prompt": "a", "n": 2, "best_of": 3}, "best_of"),  # no choosing among candidates
    ],
)
async def test_what_text_completions_do_not_do_is_a_400(
    client: httpx.AsyncClient, body: dict[str, object], param: str
) -> None:
    response = await client.post("/v1/completions", json=body)
    assert response.status_code == 400 and response.json()["error"]["param"] == param


async def test_tokenize_and_detokenize_use_the_model_tokenizer(client: httpx.AsyncClient) -> None:
    text = await client.post("/tokenize", json={"prompt": "one three"})
    assert text.json() == {"count": 2, "max_model_len": 64, "tokens": [3, 5]}
    chat = await client.post("/tokenize", json={"messages": HELLO})
    assert chat.json()["count"] == len(chat.json()["tokens"]) >= 1
    back = await client.post("/detokenize", json={"tokens": [3, 5]})
    assert back.json() == {"prompt": "xxx xxxxx"}
    both = await client.post("/tokenize", json={"prompt": "a", "messages": HELLO})
    assert both.status_code == 400


async def test_health_is_vllms_empty_200_when_ready(client: httpx.AsyncClient) -> None:
    response = await client.get("/health")
    assert response.status_code == 200 and response.content == b""


TOOL = {
    "type": "function",
    "function": {"name": "lookup", "parameters": {"type": "object"}},
}
CALLS_JSON = ['{"tool_calls":[{"name":"lookup",', '"arguments":{"q":"x"}}]}']


async def test_a_required_tool_call_comes_back_as_tool_calls(
    client: httpx.AsyncClient, script: Script
) -> None:
    script.enqueue(CALLS_JSON)
    body = {"messages": HELLO, "tools": [TOOL], "tool_choice": "required"}
    choice = (await client.post(CHAT, json=body)).json()["choices"][0]
    assert choice["finish_reason"] == "tool_calls" and choice["message"]["content"] is None
    [call] = choice["message"]["tool_calls"]
    assert call["function"] == {"name": "lookup", "arguments": '{"q": "x"}'}
    assert call["type"] == "function" and call["id"].startswith("call_")


async def test_a_streamed_tool_call_arrives_whole_in_one_delta(
    client: httpx.AsyncClient, script: Script
) -> None:
    script.enqueue(CALLS_JSON)
    body = {"messages": HELLO, "tools": [TOOL], "tool_choice": "required", "stream": True}
    events = sse_payloads((await client.post(CHAT, json=body)).text)
    deltas = [e["choices"][0]["delta"] for e in events[:-1]]
    assert [d.get("content") for d in deltas[1:]] == [None, None]  # no raw JSON text
    [call] = deltas[1]["tool_calls"]
    assert call["index"] == 0 and call["function"]["name"] == "lookup"
    assert events[-2]["choices"][0]["finish_reason"] == "tool_calls"


RESPONSE_JSON = ['{"response":"Hel', 'lo \\"', 'there\\""}']


@pytest.mark.parametrize("choice", [None, "auto"])
async def test_with_auto_a_response_streams_as_content_as_it_is_written(
    client: httpx.AsyncClient, script: Script, choice: str | None
) -> None:
    script.enqueue(RESPONSE_JSON)
    body = {"messages": HELLO, "tools": [TOOL], "stream": True, "tool_choice": choice}
    events = sse_payloads((await client.post(CHAT, json=body)).text)
    deltas = [e["choices"][0]["delta"] for e in events[:-1]]
    assert [d.get("content") for d in deltas[1:]] == ["Hel", 'lo "', 'there"', None]
    assert events[-2]["choices"][0]["finish_reason"] == "stop"
    script.enqueue(RESPONSE_JSON)
    whole = (await client.post(CHAT, json={**body, "stream": False})).json()["choices"][0]
    assert whole["message"] == {"role": "assistant", "content": 'Hello "there"'}
    assert whole["finish_reason"] == "stop"


async def test_with_auto_calls_come_back_as_tool_calls(
    client: httpx.AsyncClient, script: Script
) -> None:
    script.enqueue(CALLS_JSON)
    choice = (await client.post(CHAT, json={"messages": HELLO, "tools": [TOOL]})).json()
    assert choice["choices"][0]["finish_reason"] == "tool_calls"
    assert choice["choices"][0]["message"]["tool_calls"][0]["function"]["name"] == "lookup"


async def test_with_auto_the_model_is_told_both_forms_and_none_tells_it_nothing(
    client: httpx.AsyncClient, script: Script
) -> None:
    script.enqueue(['{"response":"x"}'])
    await client.post(CHAT, json={"messages": HELLO, "tools": [TOOL]})
    told = script.history[-1][0][0]
    assert (
        told["role"] == "system" and '"response"' in told["content"] and "lookup" in told["content"]
    )
    script.enqueue(["plain"])
    reply = await client.post(
        CHAT, json={"messages": HELLO, "tools": [TOOL], "tool_choice": "none"}
    )
    assert script.history[-1][0] == HELLO
    assert reply.json()["choices"][0]["message"]["content"] == "plain"


NATIVE_REPLY = [
    "Let me look.",
    " <tool_call>\n",
    '{"name":"lookup","arguments":{}}',
    "\n</tool_call>",
]


async def test_a_template_with_its_own_tool_format_gets_the_tools_and_a_lazy_grammar(
    client: httpx.AsyncClient, script: Script
) -> None:
    script.tool_format = HERMES
    script.enqueue(NATIVE_REPLY)
    body = {"messages": HELLO, "tools": [TOOL], "stream": True}
    events = sse_payloads((await client.post(CHAT, json=body)).text)
    sent, params = script.history[-1]
    assert sent == HELLO and script.tools == [TOOL]  # the template lists them, not our note
    assert params.grammar is not None and "tool_call" in params.grammar
    deltas = [e["choices"][0]["delta"] for e in events[:-1]]
    assert "".join(d.get("content") or "" for d in deltas) == "Let me look. "
    [call] = next(d["tool_calls"] for d in deltas if d.get("tool_calls"))
    assert call["function"] == {"name": "lookup", "arguments": "{}"}
    assert events[-2]["choices"][0]["finish_reason"] == "tool_calls"
    script.enqueue(NATIVE_REPLY)
    whole = (await client.post(CHAT, json={**body, "stream": False})).json()["choices"][0]
    assert whole["message"]["content"] == "Let me look. " and whole["finish_reason"] == "tool_calls"


async def test_with_a_native_format_required_calls_keep_the_generic_form(
    client: httpx.AsyncClient, script: Script
) -> None:
    script.tool_format = HERMES
    script.enqueue(CALLS_JSON)
    body = {"messages": HELLO, "tools": [TOOL], "tool_choice": "required"}
    choice = (await client.post(CHAT, json=body)).json()["choices"][0]
    assert script.tools is None and choice["finish_reason"] == "tool_calls"


async def test_a_conversation_with_tool_results_is_accepted(
    client: httpx.AsyncClient, script: Script
) -> None:
    call = {"id": "call_1", "type": "function", "function": {"name": "lookup", "arguments": "{}"}}
    messages = [
        *HELLO,
        {"role": "assistant", "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "call_1", "content": "found"},
    ]
    response = await client.post(CHAT, json={"messages": messages})
    assert response.status_code == 200
    sent = script.history[-1][0]
    assert sent[-1] == {"role": "user", "content": "Result of tool call call_1: found"}


# --- several choices (n) -------------------------------------------------------------------------


async def test_n_choices_come_back_by_index_with_the_prompt_counted_once(
    client: httpx.AsyncClient, script: Script
) -> None:
    script.enqueue(["a", "b"])
    script.enqueue(["c"])
    reply = (await client.post(CHAT, json={"messages": HELLO, "n": 2})).json()
    assert [(c["index"], c["message"]["content"]) for c in reply["choices"]] == [
        (0, "ab"),
        (1, "c"),
    ]
    assert [c["finish_reason"] for c in reply["choices"]] == ["stop", "stop"]
    assert reply["usage"]["prompt_tokens"] == 2 and reply["usage"]["completion_tokens"] == 3
    assert script.history[-1][1].n == 2


async def test_streamed_choices_each_get_a_role_their_text_and_a_finish(
    client: httpx.AsyncClient, script: Script
) -> None:
    script.enqueue(["a", "b"])
    script.enqueue(["c"])
    body = {"messages": HELLO, "n": 2, "stream": True, "stream_options": {"include_usage": True}}
    events = sse_payloads((await client.post(CHAT, json=body)).text)
    chunks = [e["choices"][0] for e in events[:-2]]
    for index, text in ((0, "ab"), (1, "c")):
        mine = [c for c in chunks if c["index"] == index]
        assert mine[0]["delta"] == {"role": "assistant", "content": ""}
        assert "".join(c["delta"].get("content") or "" for c in mine) == text
        assert [c["finish_reason"] for c in mine if c["finish_reason"]] == ["stop"]
    assert events[-2]["usage"]["completion_tokens"] == 3 and events[-1] == "[DONE]"


async def test_each_choice_makes_its_own_tool_calls(
    client: httpx.AsyncClient, script: Script
) -> None:
    script.enqueue(CALLS_JSON)
    script.enqueue(CALLS_JSON)
    body = {"messages": HELLO, "tools": [TOOL], "tool_choice": "required", "n": 2}
    choices = (await client.post(CHAT, json=body)).json()["choices"]
    assert [c["finish_reason"] for c in choices] == ["tool_calls", "tool_calls"]
    assert all(c["message"]["tool_calls"][0]["function"]["name"] == "lookup" for c in choices)


async def test_a_text_completion_of_n_choices_streams_them_by_index(
    client: httpx.AsyncClient, script: Script
) -> None:
    script.enqueue(["a"])
    script.enqueue(["b", "c"])
    body = {"prompt": "x", "n": 2, "best_of": 2}  # every candidate returned: accepted
    whole = (await client.post("/v1/completions", json=body)).json()
    assert [(c["index"], c["text"]) for c in whole["choices"]] == [(0, "a"), (1, "bc")]
    script.enqueue(["a"])
    script.enqueue(["b", "c"])
    body = {"prompt": "x", "n": 2, "stream": True}
    events = sse_payloads((await client.post("/v1/completions", json=body)).text)
    texts = {0: "", 1: ""}
    for event in events[:-1]:
        texts[event["choices"][0]["index"]] += event["choices"][0]["text"]
    assert texts == {0: "a", 1: "bc"}


async def test_continuous_usage_puts_the_usage_so_far_in_every_chunk(
    client: httpx.AsyncClient, script: Script
) -> None:
    """vLLM's `continuous_usage_stats` (guidellm sends it), on both streaming routes."""
    options = {"include_usage": True, "continuous_usage_stats": True}
    for route, body in ((CHAT, {"messages": HELLO}), ("/v1/completions", {"prompt": "hi"})):
        script.enqueue(["a", "b"])
        request = {**body, "stream": True, "stream_options": options}
        events = sse_payloads((await client.post(route, json=request)).text)[:-1]
        counts = [e["usage"]["completion_tokens"] for e in events if e["choices"]]
        assert counts == sorted(counts) and counts[-1] == 2, route  # the tokens so far
        assert events[-1]["choices"] == [] and events[-1]["usage"]["completion_tokens"] == 2
    script.enqueue(["a"])
    plain = {"messages": HELLO, "stream": True, "stream_options": {"include_usage": True}}
    events = sse_payloads((await client.post(CHAT, json=plain)).text)[:-1]
    assert all("usage" not in e for e in events if e["choices"])


async def test_an_unknown_stream_option_is_a_400_naming_it(client: httpx.AsyncClient) -> None:
    body = {"messages": HELLO, "stream": True, "stream_options": {"usage_every": 3}}
    response = await client.post(CHAT, json=body)
    assert response.status_code == 400
    assert response.json()["error"]["param"] == "stream_options.usage_every"


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"messages": [{"role": "user", "content": "x", "audio": {}}]}, "messages.0.audio"),
        (
            {"messages": [{"role": "user", "content": [{"type": "text", "text": "x", "k": 1}]}]},
            "messages.0.content.0.k",
        ),
        (
            {"messages": HELLO, "response_format": {"type": "json_object", "extra": 1}},
            "response_format.extra",
        ),
        (
            {"messages": HELLO, "tools": [{"type": "function", "function": {"name": "f", "x": 1}}]},
            "tools.0.function.x",
        ),
    ],
)
async def test_a_field_inside_a_part_of_the_request_is_refused_too(
    client: httpx.AsyncClient, body: dict[str, object], param: str
) -> None:
    response = await client.post(CHAT, json=body)
    error = response.json()["error"]
    assert response.status_code == 400 and error["param"].startswith(param), error


async def test_a_message_name_reaches_the_chat_template(
    client: httpx.AsyncClient, script: Script
) -> None:
    messages = [{"role": "user", "content": "hi", "name": "ada"}]
    assert (await client.post(CHAT, json={"messages": messages})).status_code == 200
    assert script.history[-1][0] == [{"role": "user", "content": "hi", "name": "ada"}]


@pytest.mark.parametrize(
    "constraint",
    [
        {"response_format": {"type": "json_object"}},
        {"tools": [TOOL]},
        {"tools": [TOOL], "tool_choice": "required"},
    ],
)
async def test_stop_strings_with_a_constraint_are_a_400(
    client: httpx.AsyncClient, script: Script, constraint: dict[str, object]
) -> None:
    response = await client.post(CHAT, json={"messages": HELLO, "stop": ["}"], **constraint})
    assert response.status_code == 400 and "stop cannot be combined" in response.text
    assert script.history == []


async def test_a_logit_bias_on_a_token_the_model_lacks_is_a_400(
    client: httpx.AsyncClient, script: Script
) -> None:
    response = await client.post(CHAT, json={"messages": HELLO, "logit_bias": {"5": 1, "1000": 2}})
    error = response.json()["error"]
    assert response.status_code == 400 and error["param"] == "logit_bias"
    assert "[1000]" in error["message"] and script.history == []
    script.enqueue(["ok"])
    fine = await client.post(CHAT, json={"messages": HELLO, "logit_bias": {"999": 2}})
    assert fine.status_code == 200
