"""The real Ray Serve app with `LLM_ENGINE=nxdi`, over the NxD Inference stand-in.

Everything but the NeuronCores runs for real: Ray Serve, the ingress, the model deployment's
async start, the engine's artifact store (compile once, load on every start), the slot runner and
the batching loop, on a tiny checkpoint in Mistral-7B-Instruct-v0.2's formats built here.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from harness.services import (
    REPO,
    BackendProcess,
    backend_service,
    free_port,
    kill_model_replica,
    wait_until,
)
from tests.e2e.slot_engines import check_batching_changes_no_token
from tests.mistral_checkpoint import build_checkpoint
from tests.sse import sse_payloads

pytestmark = pytest.mark.e2e

CHAT = "/v1/chat/completions"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_checkpoint(tmp_path_factory.mktemp("mistral"))


@pytest.fixture(scope="module")
def nxdi_backend(checkpoint: Path) -> Iterator[BackendProcess]:
    service = backend_service(
        free_port(),
        LLM_ENGINE="nxdi",
        LLM_MODEL=str(checkpoint),
        LLM_MAX_BATCH_SIZE="4",
        LLM_MAX_CONTEXT_LEN="256",
        LLM_NEURON_ARTIFACTS_DIR=str(checkpoint / "artifacts"),
        PYTHONPATH=str(REPO / "tests" / "neuronx"),
    )
    service.start()
    yield service
    service.kill()


def published(checkpoint: Path) -> Path:
    [found] = [p for p in (checkpoint / "artifacts").iterdir() if not p.name.startswith(".")]
    return found


def test_streams_a_chat_through_the_nxdi_engine(nxdi_backend: BackendProcess) -> None:
    request = {
        "messages": [{"role": "user", "content": "Hi"}],
        "max_tokens": 12,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    response = httpx.post(nxdi_backend.url + CHAT, json=request, timeout=120)
    events = sse_payloads(response.text)
    assert events[-1] == "[DONE]" and events[-2]["usage"]["completion_tokens"] == 12
    assert [e["choices"][0]["finish_reason"] for e in events[1:-2]][-1] == "length"


async def test_concurrent_requests_share_the_batch(nxdi_backend: BackendProcess) -> None:
    await check_batching_changes_no_token(nxdi_backend.url)


def test_n_choices_with_logprobs(nxdi_backend: BackendProcess) -> None:
    body = {
        "messages": [{"role": "user", "content": "Hi"}],
        "max_tokens": 8,
        "n": 3,
        "seed": 1,
        "ignore_eos": True,
        "logprobs": True,
        "top_logprobs": 2,
    }
    choices = httpx.post(nxdi_backend.url + CHAT, json=body, timeout=120).json()["choices"]
    assert sorted(c["index"] for c in choices) == [0, 1, 2]
    assert all(len(c["logprobs"]["content"]) == 8 for c in choices)


def test_a_json_schema_reply_follows_it(nxdi_backend: BackendProcess) -> None:
    schema = {
        "type": "object",
        "properties": {"city": {"type": "string", "maxLength": 10}},
        "required": ["city"],
        "additionalProperties": False,
    }
    body = {
        "messages": [{"role": "user", "content": "Where?"}],
        "max_tokens": 60,
        "response_format": {"type": "json_schema", "json_schema": {"name": "c", "schema": schema}},
    }
    reply = httpx.post(nxdi_backend.url + CHAT, json=body, timeout=120).json()
    assert set(json.loads(reply["choices"][0]["message"]["content"])) == {"city"}


def test_a_second_start_loads_the_published_compile(
    nxdi_backend: BackendProcess, checkpoint: Path
) -> None:
    """The model replica killed, Ray starts another: it loads what the first one compiled.
    Publishing renames a new directory into place, so a second compile would change it."""
    before = published(checkpoint)
    stamp = (before.stat().st_ino, (before / "model.pt").stat().st_mtime_ns)
    kill_model_replica(nxdi_backend)
    wait_until(lambda: nxdi_backend.health() != 200, timeout_s=60, what="/healthz leaves 200")
    wait_until(lambda: nxdi_backend.health() == 200, timeout_s=240, what="a new replica serves")
    request = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4}
    assert httpx.post(nxdi_backend.url + CHAT, json=request, timeout=120).status_code == 200
    after = published(checkpoint)
    assert (after.stat().st_ino, (after / "model.pt").stat().st_mtime_ns) == stamp
