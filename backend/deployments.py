"""Ray Serve application: a model deployment that owns the engine, and a FastAPI ingress.

`serve run backend.deployments:build_app` (or `python -m backend`) starts it; KubeRay's
serveConfigV2 points at the same `build_app`. Arguments given to `build_app` override
`LLM_*` settings.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncGenerator, Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any, cast

from fastapi import FastAPI
from ray import serve
from ray.exceptions import RayActorError, RayTaskError
from ray.serve.config import RequestRouterConfig
from ray.serve.deployment import Deployment
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError
from ray.serve.handle import DeploymentHandle, DeploymentResponseGenerator

from backend.engines.base import engine_class
from backend.errors import EngineError, OverloadedError, ServiceError
from backend.generation import GenerationEvent, ModelInfo, PromptAccepted
from backend.ingress.routes import build_api
from backend.metrics import count_rejection
from backend.protocol import (
    ChatCompletionRequest,
    DetokenizeRequest,
    DetokenizeResponse,
    GenerationRequest,
    TokenizeRequest,
    TokenizeResponse,
)
from backend.replica.model_server import ModelServer
from backend.settings import BackendSettings
from backend.tools import request_conversation

logger = logging.getLogger(__name__)

# `ray.serve.llm.request_router.PrefixCacheAffinityRouter` is this class, re-exported; that
# public module imports all of Ray Serve LLM, which requires vLLM or SGLang to be installed.
PREFIX_ROUTER = (
    "ray.llm._internal.serve.routing_policies.prefix_aware.prefix_aware_router."
    "PrefixCacheAffinityRouter"
)
# Ray probes replicas with `check_health`; a broken engine is replaced after a few failures.
_HEALTH_CHECK_PERIOD_S = 10
_HEALTH_CHECK_TIMEOUT_S = 30
# Health trusts the controller's count of running model replicas for this long.
REPLICA_STATES_MAX_AGE_S = 1.0
# Replica states on the way to RUNNING: the model is loading.
_COMING_UP = ("STARTING", "UPDATING", "RECOVERING")
_NO_REPLICA = "No model replica is running; Ray Serve is replacing it."
_NO_CONTROLLER = "Ray Serve's controller did not answer; the model's state is unknown."
# Concurrent health and model-info requests the ingress admits beside full generation queues.
_CONTROL_REQUESTS = 64
# Why a generation is refused when neither the ingress nor Ray has room for it.
_AT_CAPACITY = "The server is at capacity; retry shortly."
# Streams still running when a replica stops get this long to finish.
_GRACEFUL_SHUTDOWN_S = 20
# Autoscaling adds a replica after demand stayed high this long (a new inf2 node takes minutes
# anyway), and removes one only after it stayed low for ten minutes: bringing a replica back
# costs a node launch and a model load.
_UPSCALE_DELAY_S = 30
_DOWNSCALE_DELAY_S = 600


@serve.deployment(
    name="model",
    health_check_period_s=_HEALTH_CHECK_PERIOD_S,
    health_check_timeout_s=_HEALTH_CHECK_TIMEOUT_S,
    graceful_shutdown_timeout_s=_GRACEFUL_SHUTDOWN_S,
)
class ModelDeployment(ModelServer):
    """The model server as a Ray Serve deployment (one engine per replica)."""

    # Serve awaits an async constructor: the replica, and so the application, is not RUNNING
    # until the model answers, and KubeRay does not switch traffic to a cluster still loading.
    async def __init__(self, settings: BackendSettings) -> None:  # type: ignore[misc]
        super().__init__(settings)
        await self.start()

    async def generate_routed(self, routed: RoutedChat) -> AsyncGenerator[GenerationEvent, None]:
        """`generate`, called through the handle with what the request router reads."""
        async with contextlib.aclosing(self.generate(routed.request)) as events:
            async for event in events:
                yield event

    def __del__(self) -> None:
        self.shutdown()


@dataclass(frozen=True)
class RoutedChat:
    """A chat request as Ray Serve's prefix-aware router reads it: the router takes the text of
    `.messages` of the handle call's first argument, from dicts or strings only."""

    request: GenerationRequest

    @property
    def messages(self) -> list[dict[str, str]]:
        """The conversation as role/content dicts (a text prompt as one user message)."""
        if isinstance(self.request, ChatCompletionRequest):
            return request_conversation(self.request)
        return [{"role": "user", "content": self.request.text()}]


ReplicaStates = Callable[[], Awaitable[Mapping[str, int]]]
"""How many replicas of the model deployment are in each of Ray's replica states (`RUNNING` …)."""


class HandleModelClient:
    """`ModelClient` over a Ray handle: every Ray exception is translated here, once.

    Health never queues behind generations: whether a model replica can serve now is what Ray's
    controller counts of the deployment's running replicas (asked at most every
    `REPLICA_STATES_MAX_AGE_S`, and again at once after a replica failure seen on the handle);
    the model's id and window come from the first event of a generation, or from one `info`
    call until then.
    It holds at most `max_streams` generations (None: no limit) and refuses more at once, so
    they can never take the ingress's room for health and model info: Ray's own queue limit
    lets a burst through beyond it.
    """

    def __init__(
        self,
        handle: DeploymentHandle,
        info_timeout_s: float,
        max_streams: int | None = None,
        replica_states: ReplicaStates | None = None,
    ) -> None:
        self._handle = handle
        self._info_timeout_s = info_timeout_s
        self._max_streams = max_streams
        self._streams = 0
        self._known: ModelInfo | None = None
        self._replicas = _Cached(replica_states or _controller_replica_states(handle))

    async def info(self) -> ModelInfo:
        """Ready while the controller counts a running model replica; its id and window."""
        try:
            states = await asyncio.wait_for(self._replicas.get(), self._info_timeout_s)
        except Exception as exc:  # the controller is down or busy: nothing can be said
            logger.warning("asking Ray Serve's controller for replica states failed: %r", exc)
            return ModelInfo(None, 0, ready=False, error=_NO_CONTROLLER)
        if not states.get("RUNNING"):
            starting = any(states.get(state) for state in _COMING_UP)
            return ModelInfo(None, 0, ready=False, error=None if starting else _NO_REPLICA)
        if self._known is not None:
            return self._known
        try:
            info = await asyncio.wait_for(self._handle.info.remote(), self._info_timeout_s)
        except Exception:  # it failed meanwhile: Ray restarts it
            return ModelInfo(model_id=None, context_window=0, ready=False)
        if info.ready:
            self._known = info
        return info

    async def generate(self, request: GenerationRequest) -> AsyncGenerator[GenerationEvent, None]:
        """Stream events from the model replica; closing this generator cancels the request."""
        if self._max_streams is not None and self._streams >= self._max_streams:
            raise self._at_capacity()
        self._streams += 1
        stream = None
        try:
            handle = self._handle.options(stream=True)
            # A streaming handle's call returns a response generator (Ray's stubs say either).
            stream = cast(
                DeploymentResponseGenerator, handle.generate_routed.remote(RoutedChat(request))
            )
            async for event in stream:
                if isinstance(event, PromptAccepted):
                    self._known = ModelInfo(event.model_id, event.context_window, ready=True)
                yield event
        except Exception as exc:
            if isinstance(exc, BackPressureError):  # refused by Ray before the replica saw it
                raise self._at_capacity() from None
            if isinstance(exc, (RayActorError, DeploymentUnavailableError)):
                self._replicas.forget()  # a replica died: health asks the controller again
            raise translate_ray_error(exc) from None
        finally:
            self._streams -= 1
            if stream is not None:
                # Cancelling a request Ray refused re-raises its refusal: already translated.
                with contextlib.suppress(Exception):
                    stream.cancel()

    async def tokenize(self, request: TokenizeRequest) -> TokenizeResponse:
        """The model replica's tokenizer, through the handle (Ray errors translated)."""
        try:
            return cast(TokenizeResponse, await self._handle.tokenize.remote(request))
        except Exception as exc:
            raise translate_ray_error(exc) from None

    async def detokenize(self, request: DetokenizeRequest) -> DetokenizeResponse:
        """The model replica's tokenizer, through the handle (Ray errors translated)."""
        try:
            return cast(DetokenizeResponse, await self._handle.detokenize.remote(request))
        except Exception as exc:
            raise translate_ray_error(exc) from None

    def _at_capacity(self) -> OverloadedError:
        """The refusal of a generation nobody has room for, counted."""
        count_rejection(self._known.model_id or "" if self._known else "", "overloaded")
        return OverloadedError(_AT_CAPACITY)


class _Cached:
    """The last answer of `ask`. Once older than `REPLICA_STATES_MAX_AGE_S` it is asked again in
    the background while callers still get the last answer, so a probe never waits on a busy
    controller; only the first answer, or the next after `forget` or a failed question, is
    waited for (concurrent callers share that one question)."""

    def __init__(self, ask: ReplicaStates) -> None:
        self._ask = ask
        self._lock = asyncio.Lock()
        self._value: Mapping[str, int] | None = None
        self._asked_at = 0.0
        self._refreshing: asyncio.Task[None] | None = None

    async def get(self) -> Mapping[str, int]:
        value = self._value
        if value is None:
            async with self._lock:
                if self._value is None:
                    await self._refresh()
                value = self._value
            assert value is not None  # `_refresh` raised otherwise
            return value
        stale = time.monotonic() - self._asked_at >= REPLICA_STATES_MAX_AGE_S
        if stale and self._refreshing is None:
            self._refreshing = asyncio.create_task(self._refresh_in_background())
        return value

    def forget(self) -> None:
        self._value = None

    async def _refresh(self) -> None:
        self._value = await self._ask()
        self._asked_at = time.monotonic()

    async def _refresh_in_background(self) -> None:
        try:
            await self._refresh()
        except Exception as exc:  # the next caller asks again, and sees the failure
            logger.warning("asking Ray Serve's controller for replica states failed: %r", exc)
            self._value = None
        finally:
            self._refreshing = None


def _controller_replica_states(handle: DeploymentHandle) -> ReplicaStates:
    """Replica states of `handle`'s deployment as Ray Serve's controller reports them."""

    def ask() -> Mapping[str, int]:
        app = serve.status().applications.get(handle.app_name)
        deployment = app.deployments.get(handle.deployment_name) if app else None
        if deployment is None:
            return {}
        return {getattr(state, "value", state): n for state, n in deployment.replica_states.items()}

    async def states() -> Mapping[str, int]:
        return await asyncio.to_thread(ask)  # the client's call blocks on the controller

    return states


def translate_ray_error(exc: Exception) -> ServiceError:
    """The client-facing error for anything raised across the handle (never a traceback)."""
    cause = getattr(exc, "cause", None)  # RayTaskError wraps what the replica raised
    if isinstance(cause, ServiceError):
        return type(cause)(cause.message, param=cause.param, code=cause.code)
    if isinstance(exc, ServiceError) and not isinstance(exc, RayTaskError):
        return exc
    if isinstance(exc, BackPressureError):
        return OverloadedError(_AT_CAPACITY)
    if isinstance(exc, (RayActorError, DeploymentUnavailableError)):
        return OverloadedError("The model replica is restarting; retry shortly.")
    return EngineError(f"The model deployment failed ({type(exc).__name__}).")


@serve.deployment(name="ingress", ray_actor_options={"num_cpus": 0})
@serve.ingress()
class Ingress:
    """HTTP entry point: FastAPI routes over a handle to the model deployment."""

    def __init__(self, model: DeploymentHandle, settings: BackendSettings) -> None:
        self._client = HandleModelClient(
            model, settings.health_timeout_s, stream_capacity(settings)
        )
        self._settings = settings

    def __serve_build_asgi_app__(self) -> FastAPI:
        return build_api(self._client, self._settings)


def build_app(args: dict[str, Any] | None = None) -> serve.Application:
    """The Serve application; `args` (e.g. from `serve run ... engine=hf`) override settings."""
    settings = BackendSettings(**(args or {}))
    resources = {"neuron_cores": settings.num_neuron_cores} if settings.num_neuron_cores else {}
    # `@serve.deployment` makes each class a `Deployment`; type checkers keep the class type.
    model = (
        cast(Deployment, ModelDeployment)
        .options(
            **replica_options(settings),
            **routing_options(settings),
            max_ongoing_requests=settings.max_ongoing_requests,
            max_queued_requests=settings.max_queued_requests,
            ray_actor_options={"num_cpus": settings.model_cpus(), "resources": resources},
        )
        .bind(settings)
    )
    # The ingress only awaits: it takes every request the model replicas can hold or queue,
    # plus room for health checks and model info, which must never wait behind generations.
    streams = stream_capacity(settings) or settings.max_ongoing_requests * _replicas(settings)
    ingress = cast(Deployment, Ingress).options(max_ongoing_requests=streams + _CONTROL_REQUESTS)
    return ingress.bind(model, settings)


def stream_capacity(settings: BackendSettings) -> int | None:
    """Generations the model replicas can hold or queue at most (None: the queue is unbounded)."""
    if settings.max_queued_requests < 0:
        return None
    return (settings.max_ongoing_requests + settings.max_queued_requests) * _replicas(settings)


def _replicas(settings: BackendSettings) -> int:
    return settings.max_replicas or settings.num_replicas


def routing_options(settings: BackendSettings) -> dict[str, Any]:
    """With prefix caching and room for more than one replica, Ray Serve's prefix-aware router:
    a conversation's next turn goes to the replica that served its last one (it holds the
    conversation's KV), unless that replica is a full batch busier than another."""
    if not settings.prefix_caching or _replicas(settings) < 2:
        return {}
    if not engine_class(settings.engine).prefix_caching:
        return {}
    router = RequestRouterConfig.model_validate(
        {
            "request_router_class": PREFIX_ROUTER,
            # A replica a full batch busier than another gets no new conversation by prefix.
            "request_router_kwargs": {"imbalanced_threshold": settings.max_batch_size},
        }
    )
    return {"request_router_config": router}


def replica_options(settings: BackendSettings) -> dict[str, Any]:
    """The model deployment's replica count: fixed, or Serve autoscaling when `max_replicas`
    is set, between `num_replicas` and it."""
    if settings.max_replicas is None:
        return {"num_replicas": settings.num_replicas}
    autoscaling = {
        "min_replicas": settings.num_replicas,
        "initial_replicas": settings.num_replicas,
        "max_replicas": settings.max_replicas,
        # A full batch per replica: above it requests wait in a replica's queue, so that is
        # where one more replica starts paying off.
        "target_ongoing_requests": settings.max_batch_size,
        "upscale_delay_s": _UPSCALE_DELAY_S,
        "downscale_delay_s": _DOWNSCALE_DELAY_S,
    }
    return {"autoscaling_config": autoscaling}
