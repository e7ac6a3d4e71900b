"""The official `openai` Python client against the running backend."""

from __future__ import annotations

import openai
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
