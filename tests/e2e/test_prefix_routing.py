"""Two model replicas behind Ray Serve's prefix-aware router: a conversation's turns stay on the
replica that holds its KV, and different conversations still spread over both."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from harness.services import BackendProcess, backend_service, free_port, wait_until

pytestmark = pytest.mark.e2e

CHAT = "/v1/chat/completions"
OPENINGS = ["Tell me about lighthouses.", "Which fruit is yellow and curved?"]


@pytest.fixture(scope="module")
def two_replicas() -> Iterator[BackendProcess]:
    """Half a CPU each, so both replicas and Ray's prefix-tree actor fit on two cores."""
    service = backend_service(
        free_port(),
        LLM_NUM_REPLICAS="2",
        LLM_NUM_CPUS="0.5",
        LLM_CPU_THREADS="1",
        LLM_MAX_BATCH_SIZE="2",
        LLM_MAX_CONTEXT_LEN="2048",
    )

    def healthy() -> float | None:
        return service.metric("ray_serve_deployment_replica_healthy", deployment="model")

    try:
        service.start()  # ready when one replica answers: wait for the other as well
        wait_until(lambda: healthy() == 2, 120, lambda: f"2 healthy replicas (gauge: {healthy()})")
        yield service
    finally:  # a cluster left running would take the cores from the tests after it
        service.kill()


def test_turns_stay_with_their_replica_and_conversations_spread(
    two_replicas: BackendProcess,
) -> None:
    histories = [[{"role": "user", "content": text}] for text in OPENINGS]
    previous = [0, 0]
    for turn in range(3):
        for index, history in enumerate(histories):
            request = {"messages": history, "max_tokens": 8, "temperature": 0}
            body = httpx.post(two_replicas.url + CHAT, json=request, timeout=120).json()
            usage = body["usage"]
            if turn:  # on the other replica only the chat template's opening would be cached
                assert usage["prompt_tokens_details"]["cached_tokens"] >= previous[index], turn
            previous[index] = usage["prompt_tokens"]
            history += [body["choices"][0]["message"], {"role": "user", "content": "Go on."}]
    wait_until(lambda: sum(replica_requests(two_replicas).values()) == 6, 10, "6 exported")
    assert sorted(replica_requests(two_replicas).values()) == [3, 3]  # one conversation each


def replica_requests(backend: BackendProcess) -> dict[str, float]:
    """Requests each model replica has handled, from Ray Serve's own counter."""
    text = httpx.get(backend.metrics_url, timeout=5).text
    counts: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = sample.labels
            if (
                sample.name == "ray_serve_deployment_request_counter_total"
                and labels.get("deployment") == "model"
                and labels.get("route") == CHAT
            ):
                replica = labels["replica"]
                counts[replica] = counts.get(replica, 0.0) + sample.value
    return counts
