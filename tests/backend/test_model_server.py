"""The model server: background loading, readiness, request checks, failures."""

from __future__ import annotations

import asyncio

import pytest

from backend.errors import EngineError, OverloadedError
from backend.model_server import ModelServer, PromptAccepted
from backend.protocol import ChatCompletionRequest
from backend.settings import BackendSettings
from tests.fakes import Script, scripted_engine

REQUEST = ChatCompletionRequest.model_validate({"messages": [{"role": "user", "content": "hi"}]})


async def test_loading_server_answers_overloaded_and_is_healthy(script: Script) -> None:
    gate = asyncio.Event()
    engine = scripted_engine(script)

    class SlowEngine(engine):  # type: ignore[misc, valid-type]
        def start(self) -> None:
            while not gate.is_set():
                pass

    server = ModelServer(BackendSettings(), SlowEngine)
    assert not (await server.info()).ready
    server.check_health()  # loading is not a failure
    with pytest.raises(OverloadedError):
        await anext(server.generate(REQUEST))
    gate.set()


async def test_failed_load_fails_health_and_requests(script: Script) -> None:
    class BrokenEngine(scripted_engine(script)):  # type: ignore[misc]
        def start(self) -> None:
            raise OSError("weights not found")

    server = ModelServer(BackendSettings(), BrokenEngine)
    for _ in range(100):
        if (await server.info()).error:
            break
        await asyncio.sleep(0.01)
    info = await server.info()
    assert not info.ready and "weights not found" in (info.error or "")
    with pytest.raises(EngineError, match="weights not found"):
        server.check_health()
    with pytest.raises(EngineError):
        await anext(server.generate(REQUEST))


async def test_first_event_reports_prompt_tokens(server: ModelServer) -> None:
    events = [event async for event in server.generate(REQUEST)]
    assert events[0] == PromptAccepted(prompt_tokens=1)
    assert events[-1].finish_reason == "stop"


async def test_closing_the_stream_cancels_generation(server: ModelServer, script: Script) -> None:
    script.piece_delay_s = 0.01
    script.enqueue(["x"] * 50)
    stream = server.generate(REQUEST)
    await anext(stream)
    await anext(stream)
    await stream.aclose()
    assert script.cancelled == 1
