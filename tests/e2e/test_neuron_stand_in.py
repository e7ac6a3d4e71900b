"""The real Ray Serve app with `LLM_ENGINE=neuron`, over the transformers-neuronx stand-in.

Everything but the NeuronCores runs for real: Ray Serve, the ingress, the model deployment's
async start, the engine's artifact store, the slot runner and the batching loop, on a tiny
checkpoint in Mistral-7B-Instruct-v0.2's formats built here.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from harness.services import REPO, BackendProcess, backend_service, free_port
from tests.e2e.slot_engines import check_batching_changes_no_token
from tests.mistral_checkpoint import build_checkpoint
from tests.sse import sse_payloads

pytestmark = pytest.mark.e2e

CHAT = "/v1/chat/completions"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_checkpoint(tmp_path_factory.mktemp("mistral"))


@pytest.fixture(scope="module")
def neuron_backend(checkpoint: Path) -> Iterator[BackendProcess]:
    service = backend_service(
        free_port(),
        LLM_ENGINE="neuron",
        LLM_MODEL=str(checkpoint),
        LLM_MAX_BATCH_SIZE="4",
        LLM_MAX_CONTEXT_LEN="256",
        LLM_NEURON_ARTIFACTS_DIR=str(checkpoint / "artifacts"),
        LLM_NEURON_TRANSFORMERS=">=4.36",  # the stand-in computes with this machine's one
        PYTHONPATH=str(REPO / "tests" / "neuronx"),
    )
    service.start()
    yield service
    service.kill()


def test_streams_a_chat_through_the_neuron_engine(
    neuron_backend: BackendProcess, checkpoint: Path
) -> None:
    assert httpx.get(neuron_backend.url + "/healthz").json()["status"] == "ok"
    request = {
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello!"},
            {"role": "user", "content": "What is my name?"},
        ],
        "max_tokens": 12,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    response = httpx.post(neuron_backend.url + CHAT, json=request, timeout=120)
    events = sse_payloads(response.text)
    assert events[-1] == "[DONE]" and events[-2]["usage"]["completion_tokens"] == 12
    assert [e["choices"][0]["finish_reason"] for e in events[1:-2]][-1] == "length"
    # Published once for the replicas that come after: NEFFs beside their marker.
    [published] = [p for p in (checkpoint / "artifacts").iterdir() if not p.name.startswith(".")]
    assert (published / "compiled.json").is_file()


def test_alternation_errors_are_a_400(neuron_backend: BackendProcess) -> None:
    request = {"messages": [{"role": "assistant", "content": "I speak first"}]}
    response = httpx.post(neuron_backend.url + CHAT, json=request, timeout=60)
    assert response.status_code == 400
    assert "alternate" in response.json()["error"]["message"]


async def test_concurrent_streams_share_the_slots(neuron_backend: BackendProcess) -> None:
    await check_batching_changes_no_token(neuron_backend.url)
