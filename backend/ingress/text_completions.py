"""OpenAI's legacy text completions (`POST /v1/completions`) over a model client: whole
responses and SSE streams, as many benchmark clients expect them. The prompt is plain text,
continued as it is (no chat template)."""

from __future__ import annotations

import uuid
from collections.abc import AsyncGenerator
from dataclasses import dataclass

from backend.generation import GenerationEvent
from backend.ingress.serving import (
    ModelClient,
    deltas_of,
    framed,
    gathered,
    sse_event,
    start_generation,
    usage_of,
)
from backend.protocol import CompletionChoice, CompletionRequest, CompletionResponse, Usage, now


@dataclass(frozen=True)
class _Completion:
    """What every response or chunk of one completion shares."""

    id: str
    created: int
    model: str

    def response(
        self, choices: list[CompletionChoice], usage: Usage | None = None
    ) -> CompletionResponse:
        return CompletionResponse(
            id=self.id, created=self.created, model=self.model, choices=choices, usage=usage
        )

    def chunk(self, choices: list[CompletionChoice], usage: Usage | None = None) -> str:
        response = self.response(choices, usage)
        return sse_event(response.model_dump_json(exclude=None if usage else {"usage"}))


class CompletionService:
    """Turns a validated `CompletionRequest` into a response or a stream of SSE events."""

    def __init__(self, client: ModelClient) -> None:
        self._client = client

    async def create(
        self, request: CompletionRequest
    ) -> CompletionResponse | AsyncGenerator[str, None]:
        """Start generating; errors raised here happen before any byte is sent."""
        first, events = await start_generation(self._client, request)
        completion = _Completion(f"cmpl-{uuid.uuid4().hex}", now(), first.model_id)
        if request.stream:
            chunks = self._chunks(request, completion, first.prompt_tokens, events)
            return framed(chunks, events)
        replies = await gathered(events, request.n)
        choices = [
            CompletionChoice(index=i, text=reply.text, finish_reason=reply.finish_reason)
            for i, reply in enumerate(replies)
        ]
        tokens, cached = sum(r.tokens for r in replies), sum(r.cached for r in replies)
        return completion.response(choices, usage_of(first.prompt_tokens, tokens, cached))

    async def _chunks(
        self,
        request: CompletionRequest,
        completion: _Completion,
        prompt_tokens: int,
        events: AsyncGenerator[GenerationEvent, None],
    ) -> AsyncGenerator[str, None]:
        tokens = cached = 0
        continuous = request.wants_continuous_usage()
        async for delta in deltas_of(events):
            tokens, cached = tokens + delta.tokens, cached + delta.cached_tokens
            if delta.text or delta.finish_reason:
                choice = CompletionChoice(
                    index=delta.index, text=delta.text, finish_reason=delta.finish_reason
                )
                so_far = usage_of(prompt_tokens, tokens, cached) if continuous else None
                yield completion.chunk([choice], so_far)
        if request.wants_usage_chunk():
            yield completion.chunk([], usage_of(prompt_tokens, tokens, cached))
