"""The real Ray Serve app with the embedded model, over HTTP."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import httpx
import pytest
from transformers import PreTrainedTokenizerBase

from backend.engines.embedded import embedded_gguf_path
from backend.engines.gguf_tokenizer import load_gguf_tokenizer
from backend.settings import BackendSettings
from harness.services import BackendProcess, ServiceProcess, wait_until
from tests.sse import fewest_chunks, sse_payloads, stream_interval_s

pytestmark = pytest.mark.e2e

CHAT = "/v1/chat/completions"
RUNNING = "ray_vllm_num_requests_running"
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


def post(backend: ServiceProcess, body: dict) -> httpx.Response:
    return httpx.post(backend.url + CHAT, json=body, timeout=120)


def test_health_and_models(backend: ServiceProcess) -> None:
    assert httpx.get(backend.url + "/healthz").json() == {
        "status": "ok",
        "model": "SmolLM2-135M-Instruct",
    }
    card = httpx.get(backend.url + "/v1/models").json()["data"][0]
    assert card["id"] == "SmolLM2-135M-Instruct" and card["max_model_len"] == 8192


def test_non_streaming_answer_is_real_text(backend: ServiceProcess) -> None:
    request = {"messages": QUESTION, "max_tokens": 30, "temperature": 0, "ignore_eos": True}
    body = post(backend, request).json()
    content = body["choices"][0]["message"]["content"]
    assert content.strip() and "<|im_" not in content  # text, and no special tokens
    assert body["usage"]["completion_tokens"] == 30
    assert body["choices"][0]["finish_reason"] == "length"


def test_stream_delivers_tokens_as_they_are_produced(backend: ServiceProcess) -> None:
    request = {
        "messages": [{"role": "user", "content": "Write a long story about a dragon."}],
        "max_tokens": 60,
        "temperature": 0,
        "ignore_eos": True,  # a reply of known length, whatever the model would say
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    arrivals: list[float] = []
    lines: list[str] = []
    start = time.monotonic()
    with httpx.stream("POST", backend.url + CHAT, json=request, timeout=120) as response:
        for line in response.iter_lines():
            if line.startswith("data: "):
                arrivals.append(time.monotonic() - start)
                lines.append(line)
    events = sse_payloads("\n".join(lines))
    assert events[-1] == "[DONE]"
    assert events[-2]["usage"]["completion_tokens"] == 60
    content_at = [
        at
        for at, event in zip(arrivals, events, strict=True)
        if event != "[DONE]" and event["choices"] and event["choices"][0]["delta"].get("content")
    ]
    # Sent as produced: chunks over the reply's time, from the role chunk (the prompt
    # accepted) on, not held and let out together at the end. The backend posts a stream's
    # text at most once per interval and its end at once, so the first and the last of three
    # chunks or more are an interval apart at least. (Not against the time to first token: a
    # busy machine stretches that alone.)
    assert len(content_at) >= fewest_chunks(content_at[-1] - arrivals[0], 60)
    if len(content_at) >= 3:
        assert content_at[-1] - content_at[0] >= stream_interval_s()


@pytest.fixture(scope="module")
def served_tokenizer() -> PreTrainedTokenizerBase:
    """The tokenizer the backend's default engine (llama.cpp, embedded GGUF) encodes with, made
    as the engine makes it (read from the GGUF on first use, then cached)."""
    return load_gguf_tokenizer(embedded_gguf_path(), BackendSettings().cache_dir)


def test_second_turn_sees_the_first(
    backend: ServiceProcess, served_tokenizer: PreTrainedTokenizerBase
) -> None:
    """Memory is what reaches the model: the prompt is the template of the whole conversation."""
    tokenizer = served_tokenizer

    def template_tokens(messages: list[dict[str, str]]) -> int:
        ids = tokenizer.apply_chat_template(
            messages, add_generation_prompt=True, tokenize=True, return_dict=False
        )
        return len(ids)

    first_turn = [{"role": "user", "content": "My name is Ada. Remember it."}]
    request = {"max_tokens": 20, "temperature": 0, "ignore_eos": True}
    first = post(backend, {**request, "messages": first_turn}).json()
    conversation = [
        *first_turn,
        {"role": "assistant", "content": first["choices"][0]["message"]["content"]},
        {"role": "user", "content": "What is my name?"},
    ]
    second = post(backend, {**request, "messages": conversation}).json()
    assert first["usage"]["prompt_tokens"] == template_tokens(first_turn)
    assert second["usage"]["prompt_tokens"] == template_tokens(conversation)
    # The first answer is in the second prompt: it is longer by at least the answer's tokens.
    grown = second["usage"]["prompt_tokens"] - first["usage"]["prompt_tokens"]
    assert grown >= first["usage"]["completion_tokens"]


def test_infer_returns_only_the_reply(backend: ServiceProcess) -> None:
    response = httpx.get(
        backend.url + "/infer", params={"sentence": "What is the capital of France?"}, timeout=120
    )
    reply = response.json()
    assert isinstance(reply, list) and len(reply) == 1 and isinstance(reply[0], str)
    # The blueprint returned prompt + reply; ours starts with the reply, without special tokens.
    assert not reply[0].startswith("What is the capital") and "<|im_" not in reply[0]


BAD_REQUESTS = [
    ({"messages": []}, 400),
    ({"messages": [{"role": "wizard", "content": "x"}]}, 400),
    ({"messages": [{"role": "user", "content": 42}]}, 400),
    ({"messages": QUESTION, "n": 9}, 400),  # above LLM_MAX_CHOICES
    ({"messages": QUESTION, "max_tokens": 0}, 400),
    ({"messages": QUESTION, "max_tokens": 10**6}, 400),
    ({"messages": QUESTION, "temperature": 3}, 400),
    ({"messages": [{"role": "user", "content": "hello " * 9000}]}, 400),
    ({"messages": [{"role": "user", "content": "x" * 1_200_000}]}, 413),
]


@pytest.mark.parametrize(("body", "status"), BAD_REQUESTS)
def test_bad_input_gets_a_clear_error_and_service_keeps_answering(
    backend: ServiceProcess, body: dict, status: int
) -> None:
    response = post(backend, body)
    assert response.status_code == status
    assert response.json()["error"]["message"]
    good = post(backend, {"messages": QUESTION, "max_tokens": 5})
    assert good.status_code == 200


def test_malformed_json_is_400(backend: ServiceProcess) -> None:
    response = httpx.post(backend.url + CHAT, content=b"{oops", timeout=30)
    assert response.status_code == 400
    assert response.json()["error"]["type"] == "invalid_request_error"


async def test_concurrent_streams_all_complete(backend: ServiceProcess) -> None:
    async def one(http: httpx.AsyncClient, i: int) -> dict:
        prompt = [{"role": "user", "content": f"Tell me fact number {i} about space."}]
        request = {"messages": prompt, "max_tokens": 24, "seed": i, "ignore_eos": True}
        return (await http.post(backend.url + CHAT, json=request, timeout=120)).json()

    async with httpx.AsyncClient() as http:
        replies = await asyncio.gather(*(one(http, i) for i in range(8)))
    assert [r["usage"]["completion_tokens"] for r in replies] == [24] * 8
    assert all(r["choices"][0]["finish_reason"] == "length" for r in replies)


def test_client_that_leaves_mid_stream_frees_its_batch_slot(backend: BackendProcess) -> None:
    request = {
        "messages": [{"role": "user", "content": "Count from 1 to 1000."}],
        "max_tokens": 1500,
        "ignore_eos": True,  # it would run for minutes if nobody stopped it
        "stream": True,
    }
    with httpx.stream("POST", backend.url + CHAT, json=request, timeout=60) as response:
        lines = response.iter_lines()  # held: dropping it would close the connection now
        for _ in range(6):
            next(lines)
        wait_until(lambda: backend.metric(RUNNING) == 1, 30, "the stream is in the batch")
    # Leaving the block closes the connection mid-stream.
    wait_until(lambda: backend.metric(RUNNING) == 0, 30, "the batch slot is freed")
    assert post(backend, {"messages": QUESTION, "max_tokens": 8}).status_code == 200


def test_metrics_count_real_traffic(backend: BackendProcess) -> None:
    """vLLM's names with Ray's prefix, checked against what three requests really did."""
    counted = {
        "generation": ("ray_vllm_generation_tokens_total", {}),
        "prompt": ("ray_vllm_prompt_tokens_total", {}),
        "length": ("ray_vllm_request_success_total", {"finished_reason": "length"}),
        "ttft": ("ray_vllm_time_to_first_token_seconds_count", {}),
        "itl": ("ray_vllm_inter_token_latency_seconds_count", {}),
        "e2e": ("ray_vllm_e2e_request_latency_seconds_count", {}),
        "invalid": ("ray_chat_requests_rejected_total", {"reason": "invalid"}),
    }

    def read() -> dict[str, float]:
        return {
            key: backend.metric(name, **labels) or 0.0 for key, (name, labels) in counted.items()
        }

    before = read()  # settled: what earlier tests did may still be on its way to the exporter
    while (again := _after(1.5, read)) != before:
        before = again
    request = {"max_tokens": 5, "temperature": 0, "ignore_eos": True}
    replies = [
        post(backend, {**request, "messages": [{"role": "user", "content": f"Fact {i}?"}]}).json()
        for i in range(3)
    ]
    too_long = {"messages": QUESTION, "max_tokens": 10**4}  # above the server's cap: refused
    assert post(backend, too_long).status_code == 400
    expected = {
        "generation": 15.0,
        "prompt": float(sum(r["usage"]["prompt_tokens"] for r in replies)),
        "length": 3.0,
        "ttft": 3.0,
        "itl": 12.0,
        "e2e": 3.0,
        "invalid": 1.0,
    }

    def grown() -> dict[str, float]:
        after = read()
        return {key: after[key] - before[key] for key in counted}

    deadline = time.monotonic() + 30  # Ray exports every half second here
    while (seen := grown()) != expected and time.monotonic() < deadline:
        time.sleep(0.25)
    assert seen == expected


def _after(seconds: float, read: Callable[[], dict[str, float]]) -> dict[str, float]:
    time.sleep(seconds)
    return read()
