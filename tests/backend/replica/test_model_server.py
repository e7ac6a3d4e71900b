"""The model server: background loading, readiness, request checks, failures."""

from __future__ import annotations

import asyncio
import contextlib
import threading

import pytest

from backend.errors import EngineError, OverloadedError
from backend.generation import PromptAccepted
from backend.protocol import ChatCompletionRequest
from backend.replica.model_server import ModelServer
from backend.settings import BackendSettings
from tests.fakes import Script, scripted_engine

REQUEST = ChatCompletionRequest.model_validate({"messages": [{"role": "user", "content": "hi"}]})


async def test_loading_server_answers_overloaded_and_is_healthy(script: Script) -> None:
    gate = threading.Event()

    class SlowEngine(scripted_engine(script)):  # type: ignore[misc]
        def start(self) -> None:
            gate.wait(10)

    server = ModelServer(BackendSettings(), SlowEngine)
    loading = asyncio.create_task(server.start())
    await asyncio.sleep(0.05)
    assert not loading.done()  # a deployment's constructor awaits this: not RUNNING yet
    assert not (await server.info()).ready  # the event loop still answers while it loads
    server.check_health()  # loading is not a failure
    with pytest.raises(OverloadedError):
        await anext(server.generate(REQUEST))
    gate.set()
    await loading
    assert (await server.info()).ready


async def test_failed_load_fails_start_health_and_requests(script: Script) -> None:
    class BrokenEngine(scripted_engine(script)):  # type: ignore[misc]
        def start(self) -> None:
            raise OSError("weights not found")

    server = ModelServer(BackendSettings(), BrokenEngine)
    with pytest.raises(OSError, match="weights not found"):
        await server.start()  # the replica's constructor fails: Ray replaces the replica
    info = await server.info()
    assert not info.ready and "weights not found" in (info.error or "")
    with pytest.raises(EngineError, match="weights not found"):
        server.check_health()
    with pytest.raises(EngineError):
        await anext(server.generate(REQUEST))


async def test_first_event_reports_prompt_tokens(server: ModelServer) -> None:
    events = [event async for event in server.generate(REQUEST)]
    assert events[0] == PromptAccepted(1, model_id="scripted-model", context_window=64)
    assert events[-1].finish_reason == "stop"


async def test_closing_the_stream_cancels_generation(server: ModelServer, script: Script) -> None:
    script.piece_delay_s = 0.01
    script.enqueue(["x"] * 50)
    stream = server.generate(REQUEST)
    await anext(stream)
    await anext(stream)
    await stream.aclose()
    assert script.cancelled == 1


@pytest.mark.parametrize(
    ("second", "recorded"),
    [(["c"], ["stop"]), (["c", EngineError("lost")], ["abort"])],
    ids=["both-finish", "one-fails"],
)
async def test_a_request_of_several_choices_finishes_when_all_of_them_do(
    server: ModelServer,
    script: Script,
    monkeypatch: pytest.MonkeyPatch,
    second: list[str | BaseException],
    recorded: list[str],
) -> None:
    from backend.metrics import RequestMetrics

    finished: list[str] = []
    monkeypatch.setattr(RequestMetrics, "finish", lambda self, reason: finished.append(reason))
    script.enqueue(["a", "b"])
    script.enqueue(second)
    request = REQUEST.model_copy(update={"n": 2})
    with contextlib.suppress(EngineError):
        async for _ in server.generate(request):
            pass
    assert finished == recorded
