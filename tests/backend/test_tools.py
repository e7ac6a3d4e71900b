"""Tool calls on any model: the rendering of tool traffic for templates without a tool role, the
grammar of the calls a request requires, and the calls parsed back."""

from __future__ import annotations

import json

import jsonschema
import pytest
from transformers import PreTrainedTokenizerBase

from backend.engines.embedded import embedded_gguf_path
from backend.engines.gguf_tokenizer import load_gguf_tokenizer
from backend.protocol import ChatCompletionRequest, ChatMessage
from backend.settings import BackendSettings
from backend.tool_formats import HERMES
from backend.tools import (
    RESPONSE_OPENING,
    NativeReplyReader,
    ReplyReader,
    conversation,
    new_call_id,
    parse_calls,
    request_conversation,
    tool_mode,
    tools_grammar,
)
from tests.backend.test_json_schema import WITH_EXTRA_KEYS
from tests.backend.test_structured import grammar_accepts, random_constrained_text
from tests.client_models import MODELS, Project, follows_exactly, schema_of

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


def test_tools_without_a_choice_let_the_model_choose() -> None:
    assert tool_mode(request(tools=[WEATHER])) == "auto"
    assert tool_mode(request(tools=[WEATHER], tool_choice="auto")) == "auto"
    assert tool_mode(request(tools=[WEATHER], tool_choice="required")) == "required"
    assert tool_mode(request(tools=[WEATHER], tool_choice="none")) == "none"
    told = request_conversation(request(tools=[WEATHER]))[0]["content"]
    assert '"response"' in told and "get_weather" in told  # both forms are explained
    assert request_conversation(request(tools=[WEATHER], tool_choice="none"))[0]["role"] == "user"


def replies_allowed(tokenizer: PreTrainedTokenizerBase, grammar: str, seeds: int) -> list[str]:
    return [random_constrained_text(tokenizer, grammar, seed) for seed in range(seeds)]


def test_with_auto_any_reply_the_grammar_allows_is_calls_or_a_response(
    tokenizer: PreTrainedTokenizerBase,
) -> None:
    forms = set()
    for text in replies_allowed(tokenizer, tools_grammar(request(tools=[WEATHER])), 12):
        if text.startswith(RESPONSE_OPENING):  # random text: its string may outrun the draw
            forms.add("response")
            continue
        forms.add("tool_calls")
        for call in parse_calls(text):
            arguments = json.loads(call.function.arguments)
            jsonschema.validate(arguments, WEATHER["function"]["parameters"])
    assert forms == {"tool_calls", "response"}  # the model really has the choice


def tool(model: type, strict: bool | None = None) -> dict[str, object]:
    function = {"name": model.__name__.lower(), "parameters": schema_of(model)}
    return {"type": "function", "function": {**function, "strict": strict}}


@pytest.mark.parametrize("model", MODELS, ids=lambda m: m.__name__)
def test_pydantic_arguments_resolve_their_references_and_admit_nothing_more(
    tokenizer: PreTrainedTokenizerBase, model: type
) -> None:
    """Nested models put `$defs` at the root of `parameters`; embedded in the call's grammar
    the references still resolve, and every key the model does not name is refused."""
    for choice in ("required", "auto"):
        grammar = tools_grammar(request(tools=[tool(model), WEATHER], tool_choice=choice))
        for text in replies_allowed(tokenizer, grammar, 4):
            for call in [] if text.startswith(RESPONSE_OPENING) else parse_calls(text):
                if call.function.name == model.__name__.lower():
                    assert follows_exactly(model, json.loads(call.function.arguments))


def test_a_function_that_says_strict_false_is_read_literally(
    tokenizer: PreTrainedTokenizerBase,
) -> None:
    """The check above can fail: read literally, pydantic's schema lets other keys in."""
    arguments = json.dumps(WITH_EXTRA_KEYS[1], separators=(",", ":"))
    text = '{"tool_calls":[{"name":"project","arguments":' + arguments + "}]}"
    for strict, accepted in ((False, True), (None, False), (True, False)):
        grammar = tools_grammar(request(tools=[tool(Project, strict)], tool_choice="required"))
        assert grammar_accepts(tokenizer, grammar, text) is accepted


RESPONSE = 'Line one\nsaid "hi" \\ café 😀 end'  # JSON escapes: \n \" \\ \u00e9 and a pair


def test_a_response_streams_as_its_text_however_the_tokens_split_it() -> None:
    raw = json.dumps({"response": RESPONSE}, separators=(",", ":"))
    for size in (1, 2, 3, 7):
        reader = ReplyReader("auto", "m")
        content = "".join(reader.feed(raw[i : i + size]) for i in range(0, len(raw), size))
        rest, calls, reason = reader.finish("stop")
        assert (content + rest, calls, reason) == (RESPONSE, None, "stop")
    reader = ReplyReader("auto", "m")
    half_pair = raw[: raw.index("\\ude00") + 3]
    assert reader.feed(half_pair) == RESPONSE[: RESPONSE.index("😀")]  # no half of a character


@pytest.mark.parametrize(
    ("body", "text"),
    [
        ("\\ud800abcd", "\ufffdabcd"),  # a lone high surrogate, then text
        ("\\udc00x", "\ufffdx"),  # a lone low one
        ("a\\ud83d", "a\ufffd"),  # a high one at the end
        ("a\\ud83d\\ude00b", "a😀b"),  # a pair
    ],
)
def test_what_json_escapes_allow_comes_out_as_text_utf8_can_carry(body: str, text: str) -> None:
    raw = '{"response":"' + body + '"}'
    for size in (1, len(raw)):
        reader = ReplyReader("auto", "m")
        content = "".join(reader.feed(raw[i : i + size]) for i in range(0, len(raw), size))
        rest, _, _ = reader.finish("stop")
        assert content + rest == text
        (content + rest).encode("utf-8")


def test_calls_go_out_whole_with_finish_reason_tool_calls() -> None:
    text = '{"tool_calls":[{"name":"get_weather","arguments":{"city":"Paris"}}]}'
    reader = ReplyReader("auto", "m")
    assert "".join(reader.feed(c) for c in text) == ""
    rest, calls, reason = reader.finish("stop")
    assert (
        rest == "" and reason == "tool_calls" and calls and calls[0].function.name == "get_weather"
    )
    cut = ReplyReader("required", "m")
    cut.feed(text[:20])
    assert cut.finish("length") == (text[:20], None, "length")  # what it got to, as text


def test_without_tools_the_reader_passes_text_through() -> None:
    reader = ReplyReader("none", "m")
    assert reader.feed('{"response":"x"}') == '{"response":"x"}'
    assert reader.finish("stop") == ("", None, "stop")


def test_call_ids_take_the_form_the_models_clients_expect() -> None:
    mistral = new_call_id("mistralai/Mistral-7B-Instruct-v0.2")
    assert len(mistral) == 9 and mistral.isalnum()
    other = new_call_id("SmolLM2-135M-Instruct")
    assert other.startswith("call_") and len(other) == 29


HERMES_REPLY = (
    'Let me look. <tool_call>\n{"name":"get_weather","arguments":{"city":"Paris"}}\n</tool_call>'
)


def test_a_native_reply_streams_its_text_and_ends_with_its_calls() -> None:
    for size in (1, 3, 5):
        reader = NativeReplyReader(HERMES, "m")
        pieces = [
            reader.feed(HERMES_REPLY[i : i + size]) for i in range(0, len(HERMES_REPLY), size)
        ]
        assert "".join(pieces) == "Let me look. "  # no part of the opening goes out as text
        rest, calls, reason = reader.finish("stop")
        assert rest == "" and reason == "tool_calls"
        assert calls and calls[0].function.name == "get_weather"
        assert json.loads(calls[0].function.arguments) == {"city": "Paris"}


def test_a_closing_inside_the_arguments_does_not_end_the_call() -> None:
    arguments = '{"s":"</tool_call> and <tool_call>"}'
    text = f'<tool_call>\n{{"name":"write","arguments":{arguments}}}\n</tool_call>'
    reader = NativeReplyReader(HERMES, "m")
    reader.feed(text)
    _, calls, reason = reader.finish("stop")
    assert (
        reason == "tool_calls"
        and calls
        and json.loads(calls[0].function.arguments) == {"s": "</tool_call> and <tool_call>"}
    )


def test_a_native_reply_without_calls_is_its_text_held_back_to_the_last_character() -> None:
    reader = NativeReplyReader(HERMES, "m")
    assert reader.feed("Sunny <") == "Sunny "  # '<' could open a call
    assert reader.feed("3 degrees") == "<3 degrees"
    assert reader.finish("stop") == ("", None, "stop")
    cut = NativeReplyReader(HERMES, "m")
    assert cut.feed("Hi <tool_call>\n{") == "Hi "
    assert cut.finish("length") == ("<tool_call>\n{", None, "length")  # what it got to, as text
