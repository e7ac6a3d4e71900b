"""The model deployment's logic: one engine, loaded by `start()`, fed validated chat requests.

It is a plain class (Ray wraps it in `backend.deployments`), so tests drive it directly with a
fake engine.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import AsyncGenerator
from contextlib import aclosing

from backend.engines.base import Engine, engine_class
from backend.errors import (
    EngineError,
    InvalidRequestError,
    NotFoundError,
    OverloadedError,
    ServiceError,
    rejection_reason,
)
from backend.generation import GenerationEvent, ModelInfo, PromptAccepted, SamplingParams
from backend.metrics import RequestMetrics
from backend.protocol import (
    ChatCompletionRequest,
    DetokenizeRequest,
    DetokenizeResponse,
    GenerationRequest,
    TokenizeRequest,
    TokenizeResponse,
)
from backend.settings import BackendSettings
from backend.structured import json_grammar
from backend.tools import (
    conversation,
    native_grammar,
    request_conversation,
    tool_mode,
    tools_grammar,
)

logger = logging.getLogger(__name__)


class ModelServer:
    """Owns one engine: `start()` loads it, then it serves chat requests through it."""

    def __init__(self, settings: BackendSettings, engine_cls: type[Engine] | None = None) -> None:
        self._settings = settings
        self._engine = (engine_cls or engine_class(settings.engine))(settings)
        self._ready = threading.Event()
        self._load_error: str | None = None
        self._metrics: RequestMetrics | None = None

    async def start(self) -> None:
        """Load the model in a thread (the event loop keeps answering); raise if that fails."""
        try:
            await asyncio.to_thread(self._engine.start)
        except Exception as exc:
            logger.exception("loading the model failed")
            self._load_error = f"{type(exc).__name__}: {exc}"
            raise
        self._metrics = RequestMetrics(self._engine.model_id)
        self._ready.set()

    async def info(self) -> ModelInfo:
        """The model's id and window once loaded; `ready=False` while loading or after a failure."""
        if not self._ready.is_set():
            return ModelInfo(model_id=None, context_window=0, ready=False, error=self._load_error)
        return ModelInfo(self._engine.model_id, self._engine.context_window, ready=True)

    async def generate(self, request: GenerationRequest) -> AsyncGenerator[GenerationEvent, None]:
        """`PromptAccepted`, then the reply's deltas; invalid requests raise before the first."""
        try:
            prompt_ids, params, tool_format = await self._admit(request)
        except ServiceError as exc:
            if self._metrics is not None:
                self._metrics.reject(rejection_reason(exc))
            raise
        engine = self._engine
        yield PromptAccepted(len(prompt_ids), engine.model_id, engine.context_window, tool_format)
        tracker = self._metrics.track(len(prompt_ids)) if self._metrics else None
        reasons: list[str] = []  # of the choices that finished
        try:
            # aclosing: a client that leaves closes this generator, and that must reach the
            # engine now.
            async with aclosing(self._engine.generate(prompt_ids, params)) as deltas:
                async for delta in deltas:
                    if tracker is not None:
                        tracker.cached(delta.cached_tokens)
                        tracker.tokens(delta)
                    if delta.finish_reason:
                        reasons.append(delta.finish_reason)
                    yield delta
        finally:
            if tracker is not None:
                # "abort" unless every choice finished: the client left, or generation failed.
                tracker.finished(reasons[-1] if len(reasons) == params.n else "abort")

    async def _admit(
        self, request: GenerationRequest
    ) -> tuple[list[int], SamplingParams, str | None]:
        """The prompt's ids, the sampling parameters and the tool format the reply is read in."""
        self._require_ready()
        self._check_model(request.model)
        self._check_choices(request.n)
        self._check_logit_bias(request.logit_bias)
        grammar = tool_format = None
        # In threads: templating a long conversation, or building a grammar of many tools,
        # must not hold up other streams' tokens.
        if isinstance(request, ChatCompletionRequest):
            native = self._engine.tool_format if tool_mode(request) == "auto" else None
            if native is not None:  # the template lists the tools in its own words
                tools = [tool.model_dump(exclude_none=True) for tool in request.tools or []]
                messages = conversation(request.messages, tools=None, native=native)
                prompt_ids = await asyncio.to_thread(self._engine.encode_chat, messages, tools)
                grammar = await asyncio.to_thread(native_grammar, native, request)
                tool_format = native.name
            else:
                messages = request_conversation(request)
                prompt_ids = await asyncio.to_thread(self._engine.encode_chat, messages)
                grammar = await asyncio.to_thread(_reply_grammar, request)
        else:
            prompt_ids = await asyncio.to_thread(self._engine.encode_text, request.text())
        max_tokens = self._resolve_max_tokens(len(prompt_ids), request.requested_max_tokens())
        return prompt_ids, request.to_sampling_params(max_tokens, grammar), tool_format

    def _check_logit_bias(self, logit_bias: dict[str, float] | None) -> None:
        vocab = self._engine.vocab_size
        if vocab is None or not logit_bias:
            return
        unknown = sorted(int(token) for token in logit_bias if int(token) >= vocab)
        if unknown:  # as vLLM: a bias on no token is a mistake, not a no-op
            raise InvalidRequestError(
                f"logit_bias names token ids this model does not have: {unknown[:5]} (the "
                f"vocabulary has {vocab} tokens, ids 0 to {vocab - 1}).",
                param="logit_bias",
            )

    def _check_choices(self, n: int) -> None:
        limit = min(self._settings.max_choices, self._settings.max_batch_size)
        if n > limit:
            raise InvalidRequestError(
                f"n is {n}, above this server's limit of {limit} choices per request "
                "(LLM_MAX_CHOICES, and no more than a batch holds: LLM_MAX_BATCH_SIZE).",
                param="n",
            )

    async def tokenize(self, request: TokenizeRequest) -> TokenizeResponse:
        """vLLM's `/tokenize`: the prompt's token ids, as a generation would encode it."""
        self._require_ready()
        self._check_model(request.model)
        if request.messages is not None:
            messages = conversation(request.messages, tools=None)
            tokens = await asyncio.to_thread(self._engine.encode_chat, messages)
        else:
            tokens = await asyncio.to_thread(self._engine.encode_text, request.prompt or "")
        window = self._engine.context_window
        return TokenizeResponse(count=len(tokens), max_model_len=window, tokens=tokens)

    async def detokenize(self, request: DetokenizeRequest) -> DetokenizeResponse:
        """vLLM's `/detokenize`: the text of token ids."""
        self._require_ready()
        self._check_model(request.model)
        return DetokenizeResponse(prompt=await asyncio.to_thread(self._decode, request.tokens))

    def _decode(self, tokens: list[int]) -> str:
        try:
            return self._engine.decode(tokens)
        except (IndexError, OverflowError, TypeError, ValueError) as exc:
            raise InvalidRequestError(
                f"The tokens cannot be decoded: {exc}", param="tokens"
            ) from exc

    def _check_model(self, model: str | None) -> None:
        if model and model != self._engine.model_id:
            raise NotFoundError(
                f"The model {model!r} does not exist; this server serves "
                f"{self._engine.model_id!r} (see GET /v1/models).",
                param="model",
                code="model_not_found",
            )

    def check_health(self) -> None:
        """Raise if loading failed or the engine broke."""
        if self._load_error:
            raise EngineError(f"Loading the model failed: {self._load_error}")
        if self._ready.is_set():
            self._engine.check_health()

    def shutdown(self) -> None:
        """Stop the engine."""
        if self._ready.is_set():
            self._engine.shutdown()

    def _require_ready(self) -> None:
        if self._load_error:
            raise EngineError(f"The model failed to load: {self._load_error}")
        if not self._ready.is_set():
            raise OverloadedError("The model is still loading; retry in a few seconds.")
        # Before `PromptAccepted`: a stream refused now is a 503, not a 200 with an error inside.
        try:
            self._engine.check_health()
        except EngineError as exc:
            raise OverloadedError(f"{exc.message} Retry shortly.") from exc

    def _resolve_max_tokens(self, prompt_tokens: int, requested: int | None) -> int:
        window = self._engine.context_window
        cap = self._settings.max_tokens_cap
        if requested is not None and requested > cap:
            raise InvalidRequestError(
                f"max_tokens is {requested}, above this server's limit of {cap}.",
                param="max_tokens",
            )
        wanted = requested if requested is not None else 1
        if prompt_tokens + wanted > window:
            raise InvalidRequestError(
                f"This model's maximum context length is {window} tokens, but the request needs "
                f"{prompt_tokens + wanted} ({prompt_tokens} in the messages, {wanted} for the "
                "reply). Shorten the conversation or lower max_tokens.",
                param="messages",
                code="context_length_exceeded",
            )
        return requested or min(self._settings.default_max_tokens, window - prompt_tokens)


def _reply_grammar(request: ChatCompletionRequest) -> str | None:
    """The grammar of a chat reply without a native tool format: the tools' generic form, the
    `response_format`'s JSON, or None (free text)."""
    response_format = request.response_format
    if request.uses_tools():
        return tools_grammar(request)
    if response_format is not None and response_format.constrained():
        return json_grammar(
            response_format.target_schema(), strict=response_format.reads_strictly()
        )
    return None
