"""The handle boundary: every Ray exception becomes one of our errors, without a traceback."""

from __future__ import annotations

import asyncio
import time
from types import SimpleNamespace

import pytest
from ray._common.utils import import_attr
from ray.exceptions import RayActorError, RayTaskError
from ray.serve._private.build_app import build_app as build_serve_app
from ray.serve._private.config import DeploymentConfig
from ray.serve.exceptions import BackPressureError
from ray.serve.request_router import RequestRouter

from backend.deployments import (
    PREFIX_ROUTER,
    REPLICA_STATES_MAX_AGE_S,
    HandleModelClient,
    RoutedChat,
    build_app,
    routing_options,
    stream_capacity,
    translate_ray_error,
)
from backend.errors import EngineError, InvalidRequestError, OverloadedError
from backend.generation import ModelInfo, PromptAccepted
from backend.protocol import ChatCompletionRequest
from backend.settings import BackendSettings


def raised_in_replica(cause: Exception) -> RayTaskError:
    """What the ingress receives when the replica raises `cause` (an instance of both)."""
    return RayTaskError("generate", "Traceback (most recent call last):\n  secret.py", cause)


def test_a_replica_error_comes_back_as_itself_without_the_remote_traceback() -> None:
    cause = InvalidRequestError("too long", param="messages", code="context_length_exceeded")
    error = translate_ray_error(raised_in_replica(cause).as_instanceof_cause())
    assert type(error) is InvalidRequestError
    assert error.to_dict()["error"] == {
        "message": "too long",
        "type": "invalid_request_error",
        "param": "messages",
        "code": "context_length_exceeded",
    }


@pytest.mark.parametrize(
    ("exc", "expected"),
    [
        (BackPressureError(num_queued_requests=300, max_queued_requests=256), OverloadedError),
        (RayActorError(), OverloadedError),
        (raised_in_replica(RuntimeError("device lost")), EngineError),
        (RuntimeError("anything else"), EngineError),
    ],
)
def test_ray_errors_map_to_a_status_and_a_clean_message(
    exc: Exception, expected: type[Exception]
) -> None:
    error = translate_ray_error(exc)
    assert type(error) is expected
    assert "Traceback" not in error.message and "secret.py" not in error.message


def _deployments(args: dict[str, object]) -> dict[str, DeploymentConfig]:
    built = build_serve_app(build_app(args), name="mistral")
    return {d.name: d._deployment_config for d in built.deployments}


def test_fixed_replicas_without_max_replicas() -> None:
    config = _deployments({"num_replicas": 2})["model"]
    assert (config.num_replicas, config.autoscaling_config) == (2, None)


def test_max_replicas_turns_on_autoscaling_aimed_at_a_full_batch_per_replica() -> None:
    deployments = _deployments({"num_replicas": 1, "max_replicas": 4, "max_batch_size": 6})
    autoscaling = deployments["model"].autoscaling_config
    assert autoscaling is not None
    assert (autoscaling.min_replicas, autoscaling.max_replicas) == (1, 4)
    assert autoscaling.initial_replicas == 1
    assert autoscaling.target_ongoing_requests == 6
    # The ingress admits what the largest number of replicas can hold or queue.
    model = deployments["model"]
    assert deployments["ingress"].max_ongoing_requests >= 4 * (
        model.max_ongoing_requests + model.max_queued_requests
    )


class _EndlessStream:
    """Ray's `DeploymentResponseGenerator` (ray/serve/handle.py) as the client uses it: async
    iteration (`__aiter__`/`__anext__`) and `cancel()`; it yields events until cancelled."""

    def __init__(self) -> None:
        self.cancelled = False

    def __aiter__(self) -> _EndlessStream:
        return self

    async def __anext__(self) -> object:
        await asyncio.sleep(0)
        return PromptAccepted(3, "m", 100)

    def cancel(self) -> None:
        self.cancelled = True


class _StreamingHandle:
    """A stand-in for the model deployment's handle, as `HandleModelClient` calls it."""

    def __init__(self) -> None:
        self.streams: list[_EndlessStream] = []
        self.generate_routed = self

    def options(self, **_: object) -> _StreamingHandle:
        return self

    def remote(self, _request: object) -> _EndlessStream:
        self.streams.append(_EndlessStream())
        return self.streams[-1]


async def test_generations_beyond_the_capacity_are_refused_at_once() -> None:
    handle = _StreamingHandle()
    client = HandleModelClient(handle, info_timeout_s=1, max_streams=2)  # type: ignore[arg-type]
    request = ChatCompletionRequest(messages=[{"role": "user", "content": "hi"}])
    first, second = client.generate(request), client.generate(request)
    await anext(first), await anext(second)
    with pytest.raises(OverloadedError):
        await anext(client.generate(request))
    assert len(handle.streams) == 2  # the refused one never reached Ray
    await first.aclose()  # a stream that ends makes room, and is cancelled in Ray
    assert handle.streams[0].cancelled
    third = client.generate(request)
    await anext(third)
    assert len(handle.streams) == 3
    await second.aclose(), await third.aclose()


def test_the_ingress_keeps_room_for_control_requests_beyond_every_stream() -> None:
    settings = BackendSettings(max_ongoing_requests=8, max_queued_requests=4, max_replicas=3)
    assert stream_capacity(settings) == (8 + 4) * 3
    ingress = _deployments(settings.model_dump(exclude={"api_key"}))["ingress"]
    assert ingress.max_ongoing_requests > stream_capacity(settings)
    assert stream_capacity(BackendSettings(max_queued_requests=-1)) is None


def test_several_replicas_with_prefix_caching_are_routed_by_prefix() -> None:
    routed = routing_options(BackendSettings(engine="llamacpp", num_replicas=2))
    assert routed["request_router_config"].request_router_class == PREFIX_ROUTER
    autoscaled = BackendSettings(engine="hf", num_replicas=1, max_replicas=3)
    assert "request_router_config" in routing_options(autoscaled)
    for alone in (
        BackendSettings(engine="llamacpp"),  # one replica: nothing to choose
        BackendSettings(engine="llamacpp", num_replicas=2, prefix_caching=False),
        BackendSettings(engine="neuron", num_replicas=2),  # no prefix to keep
    ):
        assert routing_options(alone) == {}


def test_the_prefix_router_reads_the_conversation_of_a_routed_chat() -> None:
    """Ray's router takes the text of `.messages` of the call's first argument (dicts only)."""
    router_class = import_attr(PREFIX_ROUTER)
    assert issubclass(router_class, RequestRouter)
    router = router_class.__new__(router_class)
    request = ChatCompletionRequest(
        messages=[{"role": "system", "content": "Be brief. "}, {"role": "user", "content": "Hi"}]
    )
    pending = SimpleNamespace(args=[RoutedChat(request)])
    assert router._extract_text_from_request(pending) == "Be brief. Hi"
    # The request alone (pydantic messages) would give the router no text at all.
    assert router._extract_text_from_request(SimpleNamespace(args=[request])) == ""


class _Replicas:
    """Ray's controller as health asks it: replica states set by the test; counts the questions."""

    def __init__(self, **states: int) -> None:
        self.states = states
        self.asked = 0

    async def __call__(self) -> dict[str, int]:
        self.asked += 1
        return dict(self.states)


class _FailingStream(_EndlessStream):
    """A stream whose replica dies before its first event."""

    async def __anext__(self) -> object:
        raise RayActorError()


class _InfoHandle(_StreamingHandle):
    """The handle with the replica's `info` and a switch that makes its streams fail."""

    def __init__(self) -> None:
        super().__init__()
        self.info = SimpleNamespace(remote=self._info)
        self.replica_dead = False

    async def _info(self) -> ModelInfo:
        return ModelInfo("m", 100, ready=True)

    def remote(self, _request: object) -> _EndlessStream:
        if not self.replica_dead:
            return super().remote(_request)
        self.streams.append(_FailingStream())
        return self.streams[-1]


async def settled(client: HandleModelClient) -> ModelInfo:
    """Health once the controller's answer has aged: the first probe still gets the last
    answer and starts a new question in the background; the next one sees its answer."""
    await asyncio.sleep(REPLICA_STATES_MAX_AGE_S)
    await client.info()
    await asyncio.sleep(0.01)
    return await client.info()


async def test_health_follows_the_running_replicas_after_the_model_was_known() -> None:
    replicas = _Replicas(RUNNING=1)
    client = HandleModelClient(_InfoHandle(), 1, replica_states=replicas)  # type: ignore[arg-type]
    stream = client.generate(ChatCompletionRequest(messages=[{"role": "user", "content": "hi"}]))
    await anext(stream)
    await stream.aclose()
    assert (await client.info()).ready
    replicas.states = {"STOPPING": 1}  # the only replica died
    gone = await settled(client)
    assert not gone.ready and gone.error is not None and "No model replica" in gone.error
    replicas.states = {"STARTING": 1}  # Ray starts another: it loads the model
    assert await settled(client) == ModelInfo(None, 0, ready=False)
    replicas.states = {"RUNNING": 1}
    assert await settled(client) == ModelInfo("m", 100, ready=True)


async def test_a_slow_controller_never_holds_up_a_probe_once_it_has_answered() -> None:
    class SlowReplicas(_Replicas):
        async def __call__(self) -> dict[str, int]:
            if self.asked:  # every question after the first takes a second
                await asyncio.sleep(1.0)
            return await super().__call__()

    client = HandleModelClient(_InfoHandle(), 5, replica_states=SlowReplicas(RUNNING=1))  # type: ignore[arg-type]
    assert (await client.info()).ready
    await asyncio.sleep(REPLICA_STATES_MAX_AGE_S)
    started = time.monotonic()
    assert (await client.info()).ready  # the last answer, while the new question runs
    assert time.monotonic() - started < 0.5


async def test_a_replica_failure_on_the_handle_makes_health_ask_the_controller_again() -> None:
    replicas, handle = _Replicas(RUNNING=1), _InfoHandle()
    client = HandleModelClient(handle, 1, replica_states=replicas)  # type: ignore[arg-type]
    await asyncio.gather(client.info(), client.info(), client.info())
    assert replicas.asked == 1  # concurrent probes share one question, then its answer
    handle.replica_dead, replicas.states = True, {}
    with pytest.raises(OverloadedError):
        await anext(
            client.generate(ChatCompletionRequest(messages=[{"role": "user", "content": "hi"}]))
        )
    assert not (await client.info()).ready  # at once, not after the answer's age
    assert replicas.asked == 2


async def test_health_without_an_answer_from_the_controller_is_not_ready() -> None:
    async def unreachable() -> dict[str, int]:
        raise ConnectionError("controller down")

    client = HandleModelClient(_InfoHandle(), 1, replica_states=unreachable)  # type: ignore[arg-type]
    info = await client.info()
    assert not info.ready and info.error is not None and "controller" in info.error
