"""More streams than the model replica can run or queue: refusals are clean, health stays fast."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator

import httpx
import pytest

from harness.services import BackendProcess, backend_service, free_port

pytestmark = pytest.mark.e2e

BATCH, ONGOING, QUEUED = 2, 4, 4  # the replica holds 4 requests and Ray queues 4 more
STREAMS = 24


@pytest.fixture(scope="module")
def small_backend() -> Iterator[BackendProcess]:
    service = backend_service(
        free_port(),
        LLM_MAX_BATCH_SIZE=str(BATCH),
        LLM_MAX_ONGOING_REQUESTS=str(ONGOING),
        LLM_MAX_QUEUED_REQUESTS=str(QUEUED),
    )
    service.start()
    yield service
    service.kill()


async def test_overflow_gets_json_503_and_health_answers_meanwhile(
    small_backend: BackendProcess,
) -> None:
    url = small_backend.url
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

    async with httpx.AsyncClient(timeout=httpx.Timeout(180)) as http:
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
