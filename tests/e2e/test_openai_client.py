"""The official `openai` Python client against the running backend."""

from __future__ import annotations

import httpx
import openai
import pydantic
import pytest

from tests.e2e.services import ServiceProcess

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


def test_a_field_the_server_does_not_honour_is_refused_by_name(backend: ServiceProcess) -> None:
    tool = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}
    with pytest.raises(openai.BadRequestError) as raised:
        client(backend).chat.completions.create(
            model="SmolLM2-135M-Instruct",
            messages=[{"role": "user", "content": "Hi"}],
            tools=[tool],  # type: ignore[list-item]
        )
    assert "tools" in str(raised.value)


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
