"""OpenAI Chat Completions wire models: requests, responses, stream chunks. No serving logic."""

from __future__ import annotations

import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from backend.generation import SamplingParams

MAX_STOP_SEQUENCES = 4


class TextPart(BaseModel):
    """One text part of a message's content, as in OpenAI's content-parts form."""

    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    """A chat message; content is a string or a list of text parts."""

    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]

    def text(self) -> str:
        """The content as one string."""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class StreamOptions(BaseModel):
    """`stream_options`: whether to send a final usage chunk."""

    include_usage: bool = False


class ChatCompletionRequest(BaseModel):
    """`POST /v1/chat/completions` body; unknown OpenAI fields are accepted and ignored."""

    model_config = ConfigDict(extra="ignore")

    messages: list[ChatMessage] = Field(min_length=1)
    model: str | None = None
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    n: int = Field(1, ge=1, le=1, description="Only one choice per request is supported.")
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    # vLLM's extension: generate to max_tokens (benchmarks, and tests that need a long reply).
    ignore_eos: bool = False

    @field_validator("stop")
    @classmethod
    def _check_stop(cls, value: str | list[str] | None) -> str | list[str] | None:
        stops = [value] if isinstance(value, str) else value or []
        if len(stops) > MAX_STOP_SEQUENCES:
            raise ValueError(f"at most {MAX_STOP_SEQUENCES} stop sequences are allowed")
        if any(not stop for stop in stops):
            raise ValueError("stop sequences must not be empty")
        return value

    def requested_max_tokens(self) -> int | None:
        """`max_completion_tokens` (current OpenAI name) or `max_tokens` (legacy)."""
        return self.max_completion_tokens or self.max_tokens

    def wants_usage_chunk(self) -> bool:
        """Whether a streamed response ends with a usage chunk."""
        return bool(self.stream_options and self.stream_options.include_usage)

    def chat(self) -> list[dict[str, str]]:
        """Messages as plain role/content dicts for a chat template."""
        return [{"role": m.role, "content": m.text()} for m in self.messages]

    def to_sampling_params(self, max_tokens: int) -> SamplingParams:
        """Engine sampling parameters, with `max_tokens` already resolved by the server."""
        stops = [self.stop] if isinstance(self.stop, str) else self.stop or []
        return SamplingParams(
            max_tokens=max_tokens,
            temperature=self.temperature,
            top_p=self.top_p,
            stop=tuple(stops),
            seed=self.seed,
            ignore_eos=self.ignore_eos,
        )


class PromptTokensDetails(BaseModel):
    """OpenAI's breakdown of the prompt tokens."""

    cached_tokens: int = Field(
        0, description="Prompt tokens resumed from the KV cache instead of being computed."
    )


class Usage(BaseModel):
    """Token counts of one request."""

    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails = Field(default_factory=PromptTokensDetails)


class ResponseMessage(BaseModel):
    """The assistant's message in a non-streamed response."""

    role: Literal["assistant"] = "assistant"
    content: str


class Choice(BaseModel):
    """The one choice of a non-streamed response."""

    index: int = 0
    message: ResponseMessage
    finish_reason: str | None


class ChatCompletionResponse(BaseModel):
    """A whole (non-streamed) chat completion."""

    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[Choice]
    usage: Usage


class DeltaMessage(BaseModel):
    """What one stream chunk adds to the assistant's message."""

    role: Literal["assistant"] | None = None
    content: str | None = None


class ChunkChoice(BaseModel):
    """The one choice of a stream chunk."""

    index: int = 0
    delta: DeltaMessage
    finish_reason: str | None = None


class ChatCompletionChunk(BaseModel):
    """One server-sent event of a streamed chat completion."""

    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChunkChoice]
    usage: Usage | None = None


class ModelCard(BaseModel):
    """One entry of `GET /v1/models`."""

    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "mistral-inf2-chat"
    max_model_len: int


class ModelList(BaseModel):
    """`GET /v1/models`."""

    object: Literal["list"] = "list"
    data: list[ModelCard]


def completion_id() -> str:
    """A fresh response id."""
    return f"chatcmpl-{uuid.uuid4().hex}"


def now() -> int:
    """Unix time in seconds, as OpenAI's `created`."""
    return int(time.time())


def validation_param(loc: tuple[Any, ...]) -> str | None:
    """OpenAI-style `param` (`messages.0.content`) from a pydantic error location."""
    parts = [str(p) for p in loc if p not in ("body", "query")]
    # Union members add their type name to the location; it names no field.
    parts = [p for p in parts if p not in ("str", "list[TextPart]", "TextPart")]
    return ".".join(parts) or None
