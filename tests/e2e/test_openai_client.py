"""The official `openai` Python client against the running backend."""

from __future__ import annotations

import json
from typing import Any

import httpx
import jsonschema
import openai
import pydantic
import pytest

from harness.services import ServiceProcess

pytestmark = pytest.mark.e2e


def client(backend: ServiceProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=backend.url + "/v1", api_key="unused", max_retries=0)


def test_create_without_streaming(backend: ServiceProcess) -> None:
    completion = client(backend).chat.completions.create(
        model="SmolLM2-135M-Instruct",
        messages=[{"role": "user", "content": "What is the capital of France?"}],
        max_tokens=20,
        temperature=0,
        extra_body={"ignore_eos": True},
    )
    assert (completion.choices[0].message.content or "").strip()
    assert completion.usage is not None and completion.usage.completion_tokens == 20


def test_create_streaming(backend: ServiceProcess) -> None:
    stream = client(backend).chat.completions.create(
        model="SmolLM2-135M-Instruct",
        messages=[{"role": "user", "content": "Name three fruits."}],
        max_tokens=20,
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"ignore_eos": True},
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text.strip()
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 20


def test_errors_surface_as_openai_exceptions(backend: ServiceProcess) -> None:
    try:
        client(backend).chat.completions.create(
            model="SmolLM2-135M-Instruct", messages=[], max_tokens=5
        )
    except openai.BadRequestError as exc:
        assert exc.status_code == 400
        assert "messages" in str(exc)
    else:
        raise AssertionError("an empty conversation must be rejected")


class City(pydantic.BaseModel):
    """What `parse` asks the model for; its JSON schema goes out as `response_format`."""

    name: str = pydantic.Field(max_length=20)
    country: str = pydantic.Field(max_length=20)
    population_millions: int = pydantic.Field(ge=0, le=100)


def test_parse_returns_the_pydantic_model(backend: ServiceProcess) -> None:
    """The SDK's structured-output helper: the reply parses into the model, every time."""
    for temperature in (0.0, 1.0):
        completion = client(backend).chat.completions.parse(
            model="SmolLM2-135M-Instruct",
            messages=[{"role": "user", "content": "Describe Paris as JSON."}],
            response_format=City,
            max_tokens=120,
            temperature=temperature,
        )
        choice = completion.choices[0]
        assert choice.finish_reason == "stop"
        assert isinstance(choice.message.parsed, City)


def test_logprobs_come_with_each_token(backend: ServiceProcess) -> None:
    completion = client(backend).chat.completions.create(
        model="SmolLM2-135M-Instruct",
        messages=[{"role": "user", "content": "Say hello."}],
        max_tokens=6,
        temperature=0,
        logprobs=True,
        top_logprobs=3,
        extra_body={"ignore_eos": True},
    )
    content = completion.choices[0].logprobs.content  # type: ignore[union-attr]
    assert content is not None and len(content) == 6
    for entry in content:
        assert entry.logprob <= 0 and len(entry.top_logprobs) == 3
        # Greedy: the sampled token is the most likely one.
        assert entry.top_logprobs[0].logprob == pytest.approx(entry.logprob)
    assert "".join(e.token for e in content) == completion.choices[0].message.content


WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city.",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "maxLength": 20},
                "unit": {"enum": ["celsius", "fahrenheit"]},
            },
            "required": ["city", "unit"],
            "additionalProperties": False,
        },
    },
}


def test_a_tool_call_round_trip(backend: ServiceProcess) -> None:
    """The SDK's tool flow: a named function is called with arguments that follow its schema,
    its result goes back as a `tool` message, and the model answers in text."""
    sdk = client(backend)
    messages: list[Any] = [{"role": "user", "content": "What is the weather in Paris?"}]
    first = sdk.chat.completions.create(
        model="SmolLM2-135M-Instruct",
        messages=messages,
        tools=[WEATHER],  # type: ignore[list-item]
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
        # One call of bounded arguments: the grammar ends it well within max_tokens (up to 8
        # parallel calls of a 20-character city could need more, and once did).
        parallel_tool_calls=False,
        max_tokens=200,
        seed=1,
    )
    choice = first.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    calls = choice.message.tool_calls or []
    assert len(calls) == 1 and all(call.function.name == "get_weather" for call in calls)  # type: ignore[union-attr]
    for call in calls:
        arguments = json.loads(call.function.arguments)  # type: ignore[union-attr]
        jsonschema.validate(arguments, WEATHER["function"]["parameters"])  # type: ignore[index]
    messages.append(choice.message.model_dump(exclude_none=True))
    for call in calls:
        messages.append({"role": "tool", "tool_call_id": call.id, "content": "sunny, 21 C"})
    second = sdk.chat.completions.create(
        model="SmolLM2-135M-Instruct",
        messages=messages,
        max_tokens=20,
        extra_body={"ignore_eos": True},
    )
    assert second.choices[0].finish_reason == "length" and second.choices[0].message.content


@pytest.mark.parametrize("stream", [False, True])
def test_with_tools_and_no_tool_choice_the_model_answers_or_calls(
    backend: ServiceProcess, stream: bool
) -> None:
    """`auto`, the default with tools: whole or streamed, the reply is text, or calls that
    follow the schema with `finish_reason` `tool_calls`, never both."""
    reply = client(backend).chat.completions.create(
        model="SmolLM2-135M-Instruct",
        messages=[{"role": "user", "content": "What is the weather in Paris?"}],
        tools=[WEATHER],  # type: ignore[list-item]
        max_tokens=200,
        seed=3,
        stream=stream,
    )
    if stream:
        chunks = [chunk.choices[0] for chunk in reply if chunk.choices]  # type: ignore[union-attr]
        text = "".join(choice.delta.content or "" for choice in chunks)
        calls = [call for choice in chunks for call in choice.delta.tool_calls or []]
        finish = chunks[-1].finish_reason
    else:
        message = reply.choices[0].message  # type: ignore[union-attr]
        text, calls = message.content or "", list(message.tool_calls or [])
        finish = reply.choices[0].finish_reason  # type: ignore[union-attr]
    if finish == "tool_calls":
        assert calls and not text
        for call in calls:
            arguments = json.loads(call.function.arguments)  # type: ignore[union-attr]
            jsonschema.validate(arguments, WEATHER["function"]["parameters"])  # type: ignore[index]
    else:
        assert finish in ("stop", "length") and text and not calls


def test_text_completions_and_the_tokenizer_routes(backend: ServiceProcess) -> None:
    """What benchmark clients use: legacy completions (streamed), /tokenize, /health."""
    sdk = client(backend)
    stream = sdk.completions.create(
        model="SmolLM2-135M-Instruct",
        prompt="The capital of France is",
        max_tokens=8,
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"ignore_eos": True},
    )
    chunks = list(stream)
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    usage = chunks[-1].usage
    assert usage is not None and usage.completion_tokens == 8 and text
    tokens = httpx.post(backend.url + "/tokenize", json={"prompt": "The capital of France is"})
    assert tokens.json()["count"] == usage.prompt_tokens  # the prompt the completion encoded
    back = httpx.post(backend.url + "/detokenize", json={"tokens": tokens.json()["tokens"]})
    assert back.json()["prompt"].strip() == "The capital of France is"
    assert httpx.get(backend.url + "/health").status_code == 200


def test_several_choices_in_one_request(backend: ServiceProcess) -> None:
    """`n` choices, each seeded `seed + index`: the same request gives the same choices again,
    and the prompt is counted once."""
    openai_client = client(backend)
    ask: dict[str, Any] = {
        "model": "SmolLM2-135M-Instruct",
        "messages": [{"role": "user", "content": "Write a line about the sea."}],
        "max_tokens": 12,
        "temperature": 1.0,
        "seed": 7,
        "extra_body": {"ignore_eos": True},
    }
    one = openai_client.chat.completions.create(**ask)
    # The first n=3 request finds the prompt cached (from the n=1 one), as the next one does:
    # both compute it alike, so their samples compare.
    first, again = (openai_client.chat.completions.create(n=3, **ask) for _ in range(2))
    assert [c.index for c in first.choices] == [0, 1, 2]
    assert all(c.finish_reason == "length" for c in first.choices)
    assert first.usage is not None and one.usage is not None
    assert first.usage.completion_tokens == 36
    assert first.usage.prompt_tokens == one.usage.prompt_tokens
    texts = [c.message.content for c in first.choices]
    assert texts == [c.message.content for c in again.choices]
    assert len(set(texts)) > 1  # seeds 7, 8 and 9

    stream = openai_client.chat.completions.create(
        n=2, stream=True, stream_options={"include_usage": True}, **ask
    )
    streamed: dict[int, str] = {0: "", 1: ""}
    finished: list[int] = []
    usage = None
    for chunk in stream:
        usage = chunk.usage or usage
        for choice in chunk.choices:
            streamed[choice.index] += choice.delta.content or ""
            if choice.finish_reason:
                finished.append(choice.index)
    assert sorted(finished) == [0, 1] and all(text.strip() for text in streamed.values())
    assert usage is not None and usage.completion_tokens == 24
