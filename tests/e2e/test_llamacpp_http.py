"""The real Ray Serve app with `LLM_ENGINE=llamacpp` on the embedded GGUF, over HTTP (the
session's backend: llamacpp is the default engine)."""

from __future__ import annotations

import asyncio
import time

import httpx
import pytest

from backend.engines.embedded import embedded_gguf_path
from backend.engines.gguf_tokenizer import load_gguf_tokenizer
from backend.settings import BackendSettings
from harness.services import BackendProcess, wait_until
from tests.e2e import CONTEXT
from tests.sse import fewest_chunks, sse_payloads

pytestmark = pytest.mark.e2e

CHAT = "/v1/chat/completions"
RUNNING = "ray_vllm_num_requests_running"


def test_model_card_and_a_streamed_reply(backend: BackendProcess) -> None:
    url = backend.url
    assert httpx.get(url + "/healthz").json() == {"status": "ok", "model": "SmolLM2-135M-Instruct"}
    assert httpx.get(url + "/v1/models").json()["data"][0]["max_model_len"] == CONTEXT
    request = {
        "messages": [{"role": "user", "content": "Write a long story about a dragon."}],
        "max_tokens": 40,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    with httpx.stream("POST", url + CHAT, json=request, timeout=120) as response:
        lines = response.iter_lines()
        first = next(lines)  # the role chunk: the prompt is accepted, generation starts
        accepted = time.monotonic()
        events = sse_payloads("\n".join([first, *lines]))
    seconds = time.monotonic() - accepted
    assert events[-1] == "[DONE]"
    assert events[-2]["usage"]["completion_tokens"] == 40
    content = [e["choices"][0]["delta"].get("content") for e in events[1:-2] if e["choices"]]
    text = "".join(c for c in content if c)
    assert len([c for c in content if c]) >= fewest_chunks(seconds, 40)
    assert text.strip() and "<|im_" not in text


async def test_concurrent_streams_share_the_batch(backend: BackendProcess) -> None:
    """Eight streams at once: all complete, they ran together, prompts are the template's."""
    tokenizer = load_gguf_tokenizer(embedded_gguf_path(), BackendSettings().cache_dir)
    conversations = [
        [{"role": "user", "content": f"Tell me fact number {i} about space."}] for i in range(8)
    ]
    seen_running: list[float] = []

    async def one(http: httpx.AsyncClient, messages: list[dict[str, str]], seed: int) -> dict:
        request = {"messages": messages, "max_tokens": 48, "seed": seed, "ignore_eos": True}
        request |= {"stream": True, "stream_options": {"include_usage": True}}
        async with http.stream("POST", backend.url + CHAT, json=request) as response:
            lines = [line async for line in response.aiter_lines()]
        return sse_payloads("\n".join(lines))[-2]

    async def watch(done: asyncio.Event) -> None:
        while not done.is_set():
            seen_running.append(await asyncio.to_thread(backend.metric, RUNNING) or 0)
            await asyncio.sleep(0.1)

    done = asyncio.Event()
    watcher = asyncio.create_task(watch(done))
    async with httpx.AsyncClient(timeout=180) as http:
        usages = await asyncio.gather(
            *(one(http, messages, i) for i, messages in enumerate(conversations))
        )
    done.set()
    await watcher
    assert [u["usage"]["completion_tokens"] for u in usages] == [48] * 8
    expected = [
        len(
            tokenizer.apply_chat_template(
                m, add_generation_prompt=True, tokenize=True, return_dict=False
            )
        )
        for m in conversations
    ]
    assert [u["usage"]["prompt_tokens"] for u in usages] == expected
    assert max(seen_running) >= 2  # decoded in one batch, not one after another


def test_client_that_leaves_mid_stream_frees_its_sequence(
    backend: BackendProcess,
) -> None:
    request = {
        "messages": [{"role": "user", "content": "Count from 1 to 1000."}],
        "max_tokens": 1500,
        "ignore_eos": True,
        "stream": True,
    }
    with httpx.stream("POST", backend.url + CHAT, json=request, timeout=60) as response:
        lines = response.iter_lines()  # held: dropping it would close the connection now
        for _ in range(6):
            next(lines)
        wait_until(lambda: backend.metric(RUNNING) == 1, 30, "the stream is running")
    wait_until(lambda: backend.metric(RUNNING) == 0, 30, "its sequence is freed")
    short = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 8, "ignore_eos": True}
    body = httpx.post(backend.url + CHAT, json=short, timeout=60).json()
    assert body["usage"]["completion_tokens"] == 8


def test_a_follow_up_turn_reports_the_prompt_tokens_it_reused(
    backend: BackendProcess,
) -> None:
    """OpenAI's `usage.prompt_tokens_details.cached_tokens`, non-streamed and streamed."""
    url = backend.url
    history = [{"role": "user", "content": "Name three colors of the sea, one per line."}]
    request = {"messages": history, "max_tokens": 12, "temperature": 0}
    first = httpx.post(url + CHAT, json=request, timeout=120).json()
    history += [
        first["choices"][0]["message"],
        {"role": "user", "content": "And of the sky?"},
    ]
    body = {**request, "stream": True, "stream_options": {"include_usage": True}}
    with httpx.stream("POST", url + CHAT, json=body, timeout=120) as response:
        usage = sse_payloads("\n".join(response.iter_lines()))[-2]["usage"]
    cached = usage["prompt_tokens_details"]["cached_tokens"]
    assert first["usage"]["prompt_tokens"] < cached < usage["prompt_tokens"]
