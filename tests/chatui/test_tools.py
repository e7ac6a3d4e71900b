"""The Tools setting read into a request's `tools` and `tool_choice`, with messages that say what
to fix."""

from __future__ import annotations

import json
from typing import Any

import pytest

from chatui.tools import AUTO, REQUIRED, ToolRequest, ToolsError, tool_choices, tool_request


def function(name: str, **extra: Any) -> dict[str, Any]:
    """One function tool, as a user writes it."""
    parameters = {"type": "object", "properties": {"city": {"type": "string"}}}
    return {"type": "function", "function": {"name": name, "parameters": parameters, **extra}}


TOOLS = [function("get_weather", description="The weather in a city"), function("get_time")]


@pytest.mark.parametrize("text", ["", "  \n", "[]"])
def test_no_tools_is_a_plain_chat(text: str) -> None:
    assert tool_request(text, REQUIRED) is None
    assert tool_request(text, REQUIRED, json_output=True) is None
    assert tool_choices(text) == [AUTO, REQUIRED]


def test_the_tools_go_as_written_and_required_lets_the_model_pick() -> None:
    request = tool_request(json.dumps(TOOLS), REQUIRED)
    assert request == ToolRequest(tuple(TOOLS), REQUIRED)
    assert request.body() == {"tools": TOOLS, "tool_choice": "required"}
    auto = tool_request(json.dumps(TOOLS), AUTO)
    assert auto is not None and auto.body() == {"tools": TOOLS, "tool_choice": "auto"}


def test_a_named_choice_is_sent_as_openai_names_a_function() -> None:
    request = tool_request(json.dumps(TOOLS), "get_time")
    assert request is not None
    assert request.body()["tool_choice"] == {"type": "function", "function": {"name": "get_time"}}


def test_the_choices_are_auto_required_then_each_function() -> None:
    assert tool_choices(json.dumps(TOOLS)) == [AUTO, REQUIRED, "get_weather", "get_time"]


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ('[{"type": "function"', "Tools is not valid JSON: Expecting"),
        (json.dumps(TOOLS[0]), "Tools must be a JSON list of"),
        ('[{"type": "function", "function": {}}]', "tools[0].function.name: Field required"),
        ('[{"type": "retrieval"}]', "tools[0].type: Input should be 'function'"),
        (json.dumps([TOOLS[0], function("get_weather")]), "a function name twice"),
        (
            json.dumps([function("f", parameters="a string")]),
            "tools[0].function.parameters: Input should be a valid dictionary",
        ),
    ],
)
def test_tools_that_cannot_be_sent_say_what_is_wrong(text: str, says: str) -> None:
    with pytest.raises(ToolsError) as info:
        tool_request(text, REQUIRED)
    assert says in str(info.value)
    assert tool_choices(text) is None


def test_the_choice_must_be_one_of_the_functions() -> None:
    with pytest.raises(ToolsError, match=r"'get_news' is not a function of Tools: pick 'auto'"):
        tool_request(json.dumps(TOOLS), "get_news")


def test_tools_and_json_output_cannot_be_combined() -> None:
    with pytest.raises(ToolsError, match="JSON output and tools cannot be combined"):
        tool_request(json.dumps(TOOLS), REQUIRED, json_output=True)
