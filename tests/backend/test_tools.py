"""Tool calls on any model: the rendering of tool traffic for templates without a tool role, the
grammar of the calls a request requires, and the calls parsed back."""

from __future__ import annotations

import json

import jsonschema
import pytest
from transformers import PreTrainedTokenizerBase

from backend.engines.embedded import embedded_gguf_path
from backend.engines.llamacpp import load_gguf_tokenizer
from backend.protocol import ChatCompletionRequest, ChatMessage
from backend.settings import BackendSettings
from backend.tools import conversation, parse_calls, tools_grammar
from tests.backend.test_structured import random_constrained_text

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city.",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "maxLength": 20}},
            "required": ["city"],
            "additionalProperties": False,
        },
    },
}
CALL = {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": "{}"}}


def request(**fields: object) -> ChatCompletionRequest:
    body = {"messages": [{"role": "user", "content": "Weather in Paris?"}], **fields}
    return ChatCompletionRequest.model_validate(body)


def test_tool_traffic_is_rendered_as_text_the_template_can_take() -> None:
    messages = [
        ChatMessage(role="user", content="Weather in Paris and Rome?"),
        ChatMessage.model_validate(
            {"role": "assistant", "tool_calls": [CALL, {**CALL, "id": "call_2"}]}
        ),
        ChatMessage(role="tool", tool_call_id="call_1", content="sunny"),
        ChatMessage(role="tool", tool_call_id="call_2", content="rain"),
    ]
    rendered = conversation(messages, tools=request(tools=[WEATHER], tool_choice="required").tools)
    assert [m["role"] for m in rendered] == ["system", "user", "assistant", "user"]
    assert "get_weather" in rendered[0]["content"]  # the functions are listed
    assert json.loads(rendered[2]["content"])["tool_calls"][0]["name"] == "get_weather"
    assert rendered[3]["content"] == (
        "Result of tool call call_1: sunny\nResult of tool call call_2: rain"
    )


def test_without_tools_nothing_is_added() -> None:
    plain = conversation([ChatMessage(role="user", content="Hi")], tools=None)
    assert plain == [{"role": "user", "content": "Hi"}]


@pytest.mark.parametrize(
    ("fields", "match"),
    [
        ({"tools": [WEATHER]}, "auto"),  # the default with tools
        ({"tools": [WEATHER], "tool_choice": "auto"}, "auto"),
        ({"tool_choice": "required"}, "needs tools"),
        (
            {"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "x"}}},
            "not in tools",
        ),
    ],
)
def test_tool_choices_this_server_cannot_honour_are_refused(
    fields: dict[str, object], match: str
) -> None:
    with pytest.raises(ValueError, match=match):
        request(**fields)


def test_calls_parse_into_openai_tool_calls() -> None:
    text = '{"tool_calls":[{"name":"get_weather","arguments":{"city":"Paris"}}]}'
    [call] = parse_calls(text)
    assert call.function.name == "get_weather" and call.id.startswith("call_")
    assert json.loads(call.function.arguments) == {"city": "Paris"}


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerBase:
    return load_gguf_tokenizer(embedded_gguf_path(), BackendSettings().cache_dir)


@pytest.mark.parametrize("seed", range(3))
def test_any_reply_the_grammar_allows_is_a_call_whose_arguments_follow_the_schema(
    tokenizer: PreTrainedTokenizerBase, seed: int
) -> None:
    named = {"type": "function", "function": {"name": "get_weather"}}
    grammar = tools_grammar(request(tools=[WEATHER], tool_choice=named, parallel_tool_calls=False))
    calls = parse_calls(random_constrained_text(tokenizer, grammar, seed))
    assert calls and all(call.function.name == "get_weather" for call in calls)
    for call in calls:
        jsonschema.validate(json.loads(call.function.arguments), WEATHER["function"]["parameters"])
