"""The real backend with the cluster's settings: LLM_API_KEY set, Serve autoscaling on, and
admission limits (small here, to overflow them). The key check over HTTP, every metric the
Grafana dashboard queries in its real /metrics, and more streams than the model replica can run
or queue: refusals are clean, health stays fast. One backend for all three, as each backend
starts a Ray cluster of its own."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from harness.services import ARTIFACTS, BackendProcess, backend_service, free_port, wait_until
from tests.k8s import dashboard

pytestmark = pytest.mark.e2e

KEYS = ("e2e-key-8c1f07", "e2e-second-5a0b93")
CHAT = "/v1/chat/completions"
HELLO = {"messages": [{"role": "user", "content": "Hello!"}], "max_tokens": 4, "ignore_eos": True}
BATCH, ONGOING, QUEUED = 2, 4, 4  # the replica holds 4 requests and Ray queues 4 more
STREAMS = 24


@pytest.fixture(scope="module")
def locked_backend() -> Iterator[BackendProcess]:
    # LLM_MAX_REPLICAS=1: min = max = 1, but the deployment goes through Serve's autoscaling,
    # the path the cluster's manifests take.
    service = backend_service(
        free_port(),
        # One engine thread, as the shared backend (tests/e2e/conftest.py): two llama.cpp
        # threads spin-wait for each other, and beside the other worker's services a step
        # then takes many times as long.
        LLM_CPU_THREADS="1",
        LLM_API_KEY=",".join(KEYS),
        LLM_MAX_REPLICAS="1",
        LLM_MAX_BATCH_SIZE=str(BATCH),
        LLM_MAX_ONGOING_REQUESTS=str(ONGOING),
        LLM_MAX_QUEUED_REQUESTS=str(QUEUED),
    )
    service.start()  # polls /healthz without a key: it must stay open
    yield service
    service.kill()


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def test_routes_need_a_key_health_does_not(locked_backend: BackendProcess) -> None:
    url = locked_backend.url
    assert httpx.get(url + "/healthz").status_code == 200
    requests = [("POST", CHAT, HELLO), ("GET", "/v1/models", None), ("GET", "/infer", None)]
    for method, path, body in requests:
        for headers in ({}, bearer("not-the-key"), bearer(KEYS[0].upper())):
            response = httpx.request(method, url + path, json=body, headers=headers, timeout=60)
            assert response.status_code == 401, (path, response.text)
            assert response.headers["www-authenticate"] == "Bearer"
            assert response.json()["error"]["code"] == "invalid_api_key"
    for key in KEYS:
        assert httpx.get(url + "/v1/models", headers=bearer(key)).status_code == 200
        reply = httpx.post(url + CHAT, json=HELLO, headers=bearer(key), timeout=120)
        assert reply.status_code == 200 and reply.json()["usage"]["completion_tokens"] == 4
    # The official client: its AuthenticationError without the key, a reply with it.
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=url + "/v1", api_key="wrong").models.list()
    client = openai.OpenAI(base_url=url + "/v1", api_key=KEYS[1])
    stream = client.chat.completions.create(
        model=client.models.list().data[0].id,
        messages=HELLO["messages"],
        max_tokens=HELLO["max_tokens"],
        stream=True,
        extra_body={"ignore_eos": True},
    )
    finished = [
        c.choices[0].finish_reason for c in stream if c.choices and c.choices[0].finish_reason
    ]
    assert finished == ["length"]
    log = (ARTIFACTS / "backend.log").read_text(errors="replace")
    assert not any(key in log for key in KEYS)


def test_every_dashboard_query_finds_its_metrics_and_labels(locked_backend: BackendProcess) -> None:
    """After traffic of every kind the dashboard shows (replies, a refusal, a 401)."""
    url, key = locked_backend.url, bearer(KEYS[0])
    assert httpx.post(url + CHAT, json=HELLO, headers=key, timeout=120).status_code == 200
    too_long = {**HELLO, "max_tokens": 10**6}
    assert httpx.post(url + CHAT, json=too_long, headers=key, timeout=60).status_code == 400
    assert httpx.get(url + "/v1/models").status_code == 401
    board = dashboard.load()
    wanted = {
        where: (names, dashboard.label_names(expr))
        for (where, expr), names in zip(
            dashboard.queries(board), dashboard.metric_names(board).values(), strict=True
        )
    }

    def missing() -> list[str]:
        text = httpx.get(locked_backend.metrics_url, timeout=5).text
        labels: dict[str, set[str]] = {}
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                labels.setdefault(sample.name, set()).update(sample.labels)
        return [
            f"{where}: {name} {sorted(needed - labels.get(name, set()))}"
            for where, (names, needed) in wanted.items()
            for name in names
            if name not in labels or not needed <= labels[name]
        ]

    wait_until(lambda: not missing(), 60, "every dashboard metric exported")


async def test_overflow_gets_json_503_and_health_answers_meanwhile(
    locked_backend: BackendProcess,
) -> None:
    url = locked_backend.url
    request = {
        "messages": [{"role": "user", "content": "Tell me a story."}],
        "max_tokens": 40,
        "ignore_eos": True,
        "stream": True,
    }

    async def stream(http: httpx.AsyncClient) -> tuple[int, str, dict[str, str]]:
        async with http.stream("POST", url + "/v1/chat/completions", json=request) as response:
            body = (await response.aread()).decode()
            return response.status_code, body, dict(response.headers)

    async def probe(http: httpx.AsyncClient, path: str) -> tuple[int, float]:
        start = time.monotonic()
        response = await http.get(url + path)
        return response.status_code, time.monotonic() - start

    async with httpx.AsyncClient(timeout=httpx.Timeout(180), headers=bearer(KEYS[0])) as http:
        await probe(http, "/v1/models")  # the ingress has learnt the model before the flood
        streams = [asyncio.create_task(stream(http)) for _ in range(STREAMS)]
        await asyncio.sleep(2)  # every stream is admitted, queued or refused by now
        probes = [await probe(http, path) for path in ["/healthz", "/v1/models"] * 5]
        results = await asyncio.gather(*streams)
    statuses = sorted(status for status, _, _ in results)
    assert set(statuses) == {200, 503}, statuses
    assert statuses.count(200) >= ONGOING + QUEUED  # all the capacity was used
    for status, body, headers in results:
        if status == 503:
            assert headers["content-type"] == "application/json" and "retry-after" in headers
            assert '"type": "service_unavailable_error"' in body or "service_unavailable" in body
        else:
            assert body.rstrip().endswith("data: [DONE]") and '"error"' not in body
    assert all(status == 200 for status, _ in probes)
    assert max(seconds for _, seconds in probes) < 1.0, probes  # not queued behind streams
