"""OpenAI chat completions on top of a model client: whole responses and SSE streams.

This is the only place that frames server-sent events. The model client is the model deployment
behind a Ray handle in production and a plain `ModelServer` (or a fake) in tests.
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncGenerator
from contextlib import aclosing
from typing import Protocol

from backend.errors import EngineError, ServiceError
from backend.generation import Delta, GenerationEvent, ModelInfo, PromptAccepted, TokenLogprob
from backend.protocol import (
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    Choice,
    ChoiceLogprobs,
    ChunkChoice,
    DeltaMessage,
    DetokenizeRequest,
    DetokenizeResponse,
    GenerationRequest,
    PromptTokensDetails,
    ResponseMessage,
    TokenizeRequest,
    TokenizeResponse,
    ToolCallDelta,
    Usage,
    completion_id,
    now,
)
from backend.tool_formats import FORMATS
from backend.tools import NativeReplyReader, ReplyReader, tool_mode

logger = logging.getLogger(__name__)

SSE_DONE = "data: [DONE]\n\n"


class ModelClient(Protocol):
    """What the serving layer needs from the model deployment."""

    async def info(self) -> ModelInfo:
        """The model's id, window and readiness."""
        ...

    def generate(self, request: GenerationRequest) -> AsyncGenerator[GenerationEvent, None]:
        """`PromptAccepted`, then deltas; errors before the first event are the request's fault."""
        ...

    async def tokenize(self, request: TokenizeRequest) -> TokenizeResponse:
        """The token ids of a prompt or conversation."""
        ...

    async def detokenize(self, request: DetokenizeRequest) -> DetokenizeResponse:
        """The text of token ids."""
        ...


async def start_generation(
    client: ModelClient, request: GenerationRequest
) -> tuple[PromptAccepted, AsyncGenerator[GenerationEvent, None]]:
    """Submit `request`; its acknowledgement and the rest of its events. Errors raised here
    happen before any byte of the response is sent."""
    events = client.generate(request)
    first = await anext(events)
    if not isinstance(first, PromptAccepted):
        await events.aclose()
        raise EngineError("The model deployment did not acknowledge the prompt.")
    return first, events


def sse_event(payload: str) -> str:
    """One server-sent event carrying a JSON payload."""
    return f"data: {payload}\n\n"


class ChatService:
    """Turns a validated request into a `ChatCompletionResponse` or a stream of SSE events."""

    def __init__(self, client: ModelClient) -> None:
        self._client = client

    async def create(
        self, request: ChatCompletionRequest
    ) -> ChatCompletionResponse | AsyncGenerator[str, None]:
        """Start generating; errors raised here happen before any byte is sent."""
        first, events = await start_generation(self._client, request)
        if request.stream:
            return framed(self._chunks(request, first, events), events)
        return await self._collect(request, first, events)

    async def reply_text(self, request: ChatCompletionRequest) -> str:
        """Only the reply's text (for the blueprint's `/infer`)."""
        response = await self.create(request.model_copy(update={"stream": False}))
        assert isinstance(response, ChatCompletionResponse)
        return response.choices[0].message.content or ""  # `/infer` sends no tools

    async def _collect(
        self,
        request: ChatCompletionRequest,
        first: PromptAccepted,
        events: AsyncGenerator[GenerationEvent, None],
    ) -> ChatCompletionResponse:
        replies = await gathered(events, request.n)
        return ChatCompletionResponse(
            id=completion_id(),
            created=now(),
            model=first.model_id,
            choices=[
                _chat_choice(request, first, index, reply) for index, reply in enumerate(replies)
            ],
            usage=usage_of(
                first.prompt_tokens,
                sum(reply.tokens for reply in replies),
                sum(reply.cached for reply in replies),
            ),
        )

    async def _chunks(
        self,
        request: ChatCompletionRequest,
        first: PromptAccepted,
        events: AsyncGenerator[GenerationEvent, None],
    ) -> AsyncGenerator[str, None]:
        prompt_tokens = first.prompt_tokens
        chunk = _ChunkWriter(completion_id(), now(), first.model_id)
        tokens = cached = 0
        continuous = request.wants_continuous_usage()
        if continuous:
            chunk.usage_so_far = usage_of(prompt_tokens, tokens, cached)
        readers = [reply_reader(request, first) for _ in range(request.n)]
        for index in range(request.n):
            yield chunk.delta(DeltaMessage(role="assistant", content=""), index=index)
        async for delta in deltas_of(events):
            tokens += delta.tokens
            cached += delta.cached_tokens
            if continuous:
                chunk.usage_so_far = usage_of(prompt_tokens, tokens, cached)
            index, reader = delta.index, readers[delta.index]
            content = reader.feed(delta.text)
            logprobs = ChoiceLogprobs.of(list(delta.logprobs)) if request.logprobs else None
            if content or logprobs:
                yield chunk.delta(DeltaMessage(content=content), logprobs=logprobs, index=index)
            if delta.finish_reason:
                yield from_finish(chunk, reader, delta.finish_reason, index)
        if request.wants_usage_chunk():
            yield chunk.usage(usage_of(prompt_tokens, tokens, cached))


def reply_reader(
    request: ChatCompletionRequest, first: PromptAccepted
) -> ReplyReader | NativeReplyReader:
    """The reader of one choice of `request`'s reply: text, the tools' generic JSON form, or
    the chat template's own tool format (`first.tool_format`)."""
    if first.tool_format is not None:
        return NativeReplyReader(FORMATS[first.tool_format], first.model_id)
    return ReplyReader(tool_mode(request), first.model_id)


def _chat_choice(
    request: ChatCompletionRequest, first: PromptAccepted, index: int, reply: Reply
) -> Choice:
    """A whole choice: its text, and the tool calls the grammar made it write."""
    reader = reply_reader(request, first)
    content = reader.feed(reply.text)
    rest, calls, reason = reader.finish(reply.finish_reason)
    text = content + rest  # with calls, only the text a native format wrote before them
    message = ResponseMessage(content=text or (None if calls else ""), tool_calls=calls)
    logprobs = ChoiceLogprobs.of(reply.logprobs) if request.logprobs else None
    return Choice(index=index, message=message, finish_reason=reason, logprobs=logprobs)


class Reply:
    """One choice of a whole (not streamed) response, gathered from its deltas."""

    def __init__(self) -> None:
        self._parts: list[str] = []
        self.logprobs: list[TokenLogprob] = []
        self.tokens = self.cached = 0
        self.finish_reason: str | None = None

    @property
    def text(self) -> str:
        return "".join(self._parts)

    def add(self, delta: Delta) -> None:
        self._parts.append(delta.text)
        self.logprobs.extend(delta.logprobs)
        self.tokens += delta.tokens
        self.cached += delta.cached_tokens
        self.finish_reason = delta.finish_reason or self.finish_reason


async def gathered(events: AsyncGenerator[GenerationEvent, None], choices: int) -> list[Reply]:
    """Every choice of a generation, whole, by index; the events are closed however it ends."""
    replies = [Reply() for _ in range(choices)]
    async with aclosing(events):
        async for delta in deltas_of(events):
            replies[delta.index].add(delta)
    return replies


def from_finish(
    chunk: _ChunkWriter, reader: ReplyReader | NativeReplyReader, reason: str, index: int
) -> str:
    """The chunks that end a choice: the content its reader still held, its calls (whole, in
    one delta), and its finish reason."""
    rest, calls, finish_reason = reader.finish(reason)
    events = chunk.delta(DeltaMessage(content=rest), index=index) if rest else ""
    if calls:
        deltas = [ToolCallDelta(index=i, **call.model_dump()) for i, call in enumerate(calls)]
        events += chunk.delta(DeltaMessage(tool_calls=deltas), index=index)
    return events + chunk.delta(DeltaMessage(), finish_reason, index=index)


async def framed(
    chunks: AsyncGenerator[str, None], events: AsyncGenerator[GenerationEvent, None]
) -> AsyncGenerator[str, None]:
    """A stream's SSE events, then `[DONE]`. A failure after the first byte is reported in-band
    (the status line is gone); the generation is closed however the stream ends."""
    try:
        async for chunk in chunks:
            yield chunk
    except ServiceError as exc:
        yield sse_event(json.dumps(exc.to_dict()))
    except Exception as exc:
        logger.exception("stream failed")
        yield sse_event(json.dumps(EngineError(f"Generation failed: {exc}").to_dict()))
    finally:
        await chunks.aclose()
        await events.aclose()
    yield SSE_DONE


async def deltas_of(events: AsyncGenerator[GenerationEvent, None]) -> AsyncGenerator[Delta, None]:
    """The deltas among a generation's events."""
    async for event in events:
        if isinstance(event, Delta):
            yield event


def usage_of(prompt_tokens: int, completion_tokens: int, cached_tokens: int) -> Usage:
    """OpenAI's usage block."""
    return Usage(
        prompt_tokens=prompt_tokens,
        completion_tokens=completion_tokens,
        total_tokens=prompt_tokens + completion_tokens,
        prompt_tokens_details=PromptTokensDetails(cached_tokens=cached_tokens),
    )


class _ChunkWriter:
    """Serialises the chunks of one stream, which share an id, a timestamp and a model."""

    def __init__(self, chunk_id: str, created: int, model: str) -> None:
        self._base = {"id": chunk_id, "created": created, "model": model}
        self.usage_so_far: Usage | None = None  # sent with every chunk when set (vLLM's)

    def delta(
        self,
        delta: DeltaMessage,
        finish_reason: str | None = None,
        logprobs: ChoiceLogprobs | None = None,
        index: int = 0,
    ) -> str:
        choice = ChunkChoice(
            index=index, delta=delta, finish_reason=finish_reason, logprobs=logprobs
        )
        model = ChatCompletionChunk(**self._base, choices=[choice], usage=self.usage_so_far)
        data = model.model_dump(exclude=None if self.usage_so_far else {"usage"})
        data["choices"][0]["delta"] = delta.model_dump(exclude_none=True)  # `{}` on the last chunk
        return sse_event(json.dumps(data, ensure_ascii=False))

    def usage(self, usage: Usage) -> str:
        return sse_event(
            ChatCompletionChunk(**self._base, choices=[], usage=usage).model_dump_json()
        )
