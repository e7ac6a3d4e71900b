"""The client libraries people already use, pointed at the real backend with nothing configured
but the base URL: instructor and LangChain (`langchain-openai`). Their pydantic schemas carry no
`additionalProperties: false` and put nested models in `$defs`; every reply must validate
against its model and end by itself within `max_tokens` (the grammar closes it)."""

from __future__ import annotations

import json
from typing import Any

import instructor
import openai
import pytest
from langchain_core.messages import AIMessage, BaseMessage, HumanMessage, ToolMessage
from langchain_core.tools import tool
from langchain_openai import ChatOpenAI
from pydantic import BaseModel

from harness.services import ServiceProcess
from tests.client_models import Node, Pet, Project, Team, follows_exactly

pytestmark = pytest.mark.e2e

MODEL = "SmolLM2-135M-Instruct"
ASK = [{"role": "user", "content": "Ada runs project Apollo: two tasks, one urgent."}]
# Room enough for any of these models' strict replies; a reply cut by it fails the test.
MAX_TOKENS = 300
GREEDY: dict[str, Any] = {"temperature": 0, "seed": 1}


def sdk(backend: ServiceProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=backend.url + "/v1", api_key="unused", max_retries=0)


def chat_model(backend: ServiceProcess) -> ChatOpenAI:
    return ChatOpenAI(
        base_url=backend.url + "/v1",
        api_key="unused",  # type: ignore[arg-type]
        model=MODEL,
        max_tokens=MAX_TOKENS,  # type: ignore[call-arg]
        temperature=0,
        max_retries=0,
    )


@pytest.mark.parametrize("mode", [instructor.Mode.TOOLS, instructor.Mode.JSON_SCHEMA])
@pytest.mark.parametrize("model", [Project, Team, Pet], ids=lambda m: m.__name__)
def test_instructor_returns_the_model_whole(
    backend: ServiceProcess, mode: instructor.Mode, model: type[BaseModel]
) -> None:
    client = instructor.from_openai(sdk(backend), mode=mode)
    reply, completion = client.chat.completions.create_with_completion(
        model=MODEL,
        response_model=model,
        messages=ASK,
        max_tokens=MAX_TOKENS,
        max_retries=0,
        **GREEDY,
    )
    assert isinstance(reply, model)
    assert completion.choices[0].finish_reason in ("stop", "tool_calls")
    arguments = (
        completion.choices[0].message.tool_calls[0].function.arguments
        if mode == instructor.Mode.TOOLS
        else completion.choices[0].message.content
    )
    assert follows_exactly(model, json.loads(arguments or ""))  # no key the model lacks


def test_a_recursive_model_is_a_grammar_not_a_400(backend: ServiceProcess) -> None:
    """A self-referencing schema compiles; its depth has no bound, so a greedy reply may run to
    `max_tokens`, but one that ends is the model."""
    completion = sdk(backend).chat.completions.create(
        model=MODEL,
        messages=ASK,  # type: ignore[arg-type]
        max_tokens=MAX_TOKENS,
        response_format={
            "type": "json_schema",
            "json_schema": {"name": "Node", "schema": Node.model_json_schema()},
        },
        **GREEDY,
    )
    choice = completion.choices[0]
    if choice.finish_reason == "stop":
        assert follows_exactly(Node, json.loads(choice.message.content or ""))
    else:
        assert choice.finish_reason == "length"


@pytest.mark.parametrize("mode", [instructor.Mode.TOOLS, instructor.Mode.JSON_SCHEMA])
def test_instructor_streams_partial_models_that_end_whole(
    backend: ServiceProcess, mode: instructor.Mode
) -> None:
    client = instructor.from_openai(sdk(backend), mode=mode)
    partials = list(
        client.chat.completions.create_partial(
            model=MODEL, response_model=Team, messages=ASK, max_tokens=MAX_TOKENS, **GREEDY
        )
    )
    assert partials
    Team.model_validate(partials[-1].model_dump())  # the last one is complete


@pytest.mark.parametrize("method", ["json_schema", "function_calling"])
def test_langchain_structured_output(backend: ServiceProcess, method: str) -> None:
    structured = chat_model(backend).with_structured_output(Project, method=method)  # type: ignore[arg-type]
    reply = structured.invoke("Ada runs project Apollo: two tasks, one urgent.")
    assert isinstance(reply, Project)


@tool
def get_weather(city: str) -> str:
    """The weather in a city."""
    return f"sunny in {city}"


def calls_of(message: BaseMessage) -> list[dict[str, Any]]:
    assert isinstance(message, AIMessage)
    for call in message.tool_calls:
        assert call["name"] == "get_weather" and isinstance(call["args"]["city"], str)
        assert set(call["args"]) == {"city"} and call["id"]
    return list(message.tool_calls)


@pytest.mark.parametrize("choice", ["any", "get_weather"])
def test_langchain_bind_tools_must_call(backend: ServiceProcess, choice: str) -> None:
    reply = chat_model(backend).bind_tools([get_weather], tool_choice=choice).invoke("Paris?")
    assert calls_of(reply) and reply.response_metadata["finish_reason"] == "tool_calls"


@pytest.mark.parametrize("choice", ["auto", None])
def test_langchain_bind_tools_lets_the_model_choose(
    backend: ServiceProcess, choice: str | None
) -> None:
    reply = chat_model(backend).bind_tools([get_weather], tool_choice=choice).invoke("Paris?")
    finish = reply.response_metadata["finish_reason"]
    if calls_of(reply):
        assert finish == "tool_calls" and not reply.content
    else:
        assert finish == "stop" and isinstance(reply.content, str)


def test_langchain_merges_a_streamed_tool_call(backend: ServiceProcess) -> None:
    bound = chat_model(backend).bind_tools([get_weather], tool_choice="get_weather")
    merged: Any = None
    for chunk in bound.stream("What is the weather in Paris?"):
        merged = chunk if merged is None else merged + chunk
    assert calls_of(merged)
    assert merged.response_metadata["finish_reason"] == "tool_calls"


def test_langchain_tool_round_trip(backend: ServiceProcess) -> None:
    llm = chat_model(backend)
    messages: list[BaseMessage] = [HumanMessage("What is the weather in Paris?")]
    called = llm.bind_tools([get_weather], tool_choice="get_weather").invoke(messages)
    messages.append(called)
    for call in calls_of(called):
        messages.append(ToolMessage(get_weather.invoke(call["args"]), tool_call_id=call["id"]))
    answer = llm.bind_tools([get_weather]).invoke(messages)  # text, or more calls: it decides
    if answer.response_metadata["finish_reason"] == "tool_calls":
        assert calls_of(answer)
    else:  # a text answer may run on to max_tokens
        assert answer.content and answer.response_metadata["finish_reason"] in ("stop", "length")
