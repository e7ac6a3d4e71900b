"""OpenAI Chat Completions wire models: requests, responses, stream chunks. No serving logic."""

from __future__ import annotations

import re
import time
import uuid
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    SerializerFunctionWrapHandler,
    ValidationInfo,
    WithJsonSchema,
    field_validator,
    model_serializer,
    model_validator,
)

from backend.generation import SamplingParams, TokenLogprob

MAX_STOP_SEQUENCES = 4
StopText = Annotated[str, Field(min_length=1)]
PromptText = Annotated[str, Field(min_length=1)]
TokenIdText = Annotated[str, Field(pattern=r"^[0-9]{1,9}$")]  # JSON keys are strings
Bias = Annotated[float, Field(ge=-100.0, le=100.0)]
# Only token-id keys: the schema says so too (pydantic alone would allow any other key there).
LogitBias = Annotated[
    dict[TokenIdText, Bias],
    WithJsonSchema(
        {
            "type": "object",
            "patternProperties": {
                "^[0-9]{1,9}$": {"type": "number", "minimum": -100, "maximum": 100}
            },
            "additionalProperties": False,
        }
    ),
]


class _Strict(BaseModel):
    """A part of a request: a field the server does not know is refused (a 400 naming it),
    never silently ignored."""

    model_config = ConfigDict(extra="forbid")


def _published_as_text_only(schema: dict[str, Any]) -> None:
    schema["properties"] = {"type": {"const": "text"}, "text": {"type": "string"}}
    schema["required"] = ["type", "text"]


class ContentPart(_Strict):
    """One part of a message's content, in OpenAI's content-parts form. Only text is read (and
    published); the other kinds are known, so that a request with one is refused for its
    modality (the model reads text only), not for an unknown field."""

    model_config = ConfigDict(extra="forbid", json_schema_extra=_published_as_text_only)

    type: Literal["text", "image_url", "input_audio", "file"]
    text: str | None = None
    image_url: dict[str, Any] | None = None
    input_audio: dict[str, Any] | None = None
    file: dict[str, Any] | None = None

    @model_validator(mode="after")
    def _text_only(self) -> ContentPart:
        media = [kind for kind in ("image_url", "input_audio", "file") if getattr(self, kind)]
        if self.type != "text" or media:
            kinds = ", ".join(sorted({self.type, *media} - {"text"}))
            raise ValueError(f"this model reads text only: {kinds} parts are not supported")
        if self.text is None:
            raise ValueError("a text part needs its 'text'")
        return self


class FunctionCall(_Strict):
    """A function's name and its arguments, as a JSON text."""

    name: str
    arguments: str


class ToolCall(_Strict):
    """One call the assistant made."""

    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


_GIVEN = {"not": {"type": "null"}}
_NO_CALLS = {"anyOf": [{"type": "null"}, {"type": "array", "maxItems": 0}]}


def _published_with_role_rules(schema: dict[str, Any]) -> None:
    """`_complete`'s rules, in the schema: a client (or a fuzzer) following it is not refused."""
    schema["oneOf"] = [
        {
            "properties": {"role": {"enum": ["system", "developer", "user"]}, "content": _GIVEN},
            "required": ["content"],
            "not": {"required": ["tool_call_id"], "properties": {"tool_call_id": _GIVEN}},
        },
        {
            "properties": {"role": {"const": "tool"}, "content": _GIVEN, "tool_call_id": _GIVEN},
            "required": ["content", "tool_call_id"],
        },
        {
            "properties": {"role": {"const": "assistant"}},
            "not": {"required": ["tool_call_id"], "properties": {"tool_call_id": _GIVEN}},
            "anyOf": [
                {"properties": {"content": _GIVEN}, "required": ["content"]},
                {"properties": {"tool_calls": {"minItems": 1}}, "required": ["tool_calls"]},
            ],
        },
    ]
    for other in schema["oneOf"][:2]:
        other["properties"]["tool_calls"] = _NO_CALLS


class ChatMessage(_Strict):
    """A chat message; content is a string or a list of text parts. An assistant message may
    carry the tool calls it made instead of content; a `tool` message answers one of them."""

    model_config = ConfigDict(extra="forbid", json_schema_extra=_published_with_role_rules)
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    name: str | None = Field(
        None, description="The participant's name, given to the chat template with the message."
    )
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = None

    @model_validator(mode="after")
    def _complete(self) -> ChatMessage:
        if self.content is None and not (self.role == "assistant" and self.tool_calls):
            raise ValueError("content is required (an assistant message may have tool_calls)")
        if (self.role == "tool") != (self.tool_call_id is not None):
            raise ValueError("a 'tool' message, and only one, has a tool_call_id")
        if self.tool_calls and self.role != "assistant":
            raise ValueError("only an assistant message has tool_calls")
        return self

    def text(self) -> str:
        """The content as one string."""
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text or "" for part in self.content)


FunctionName = Annotated[str, Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")]


class FunctionDef(_Strict):
    """A function the model may call: its name, what it does, its arguments' JSON schema."""

    name: FunctionName
    description: str | None = None
    parameters: dict[str, Any] = Field(default_factory=lambda: {"type": "object"})
    strict: bool | None = Field(
        None,
        description="Absent or true: an object admits only the properties it names (as vLLM's "
        "xgrammar and OpenAI's strict mode); false: the schema is read literally.",
    )


class ToolDef(_Strict):
    """`tools[]`: one function."""

    type: Literal["function"]
    function: FunctionDef


class NamedFunction(_Strict):
    name: FunctionName


class NamedToolChoice(_Strict):
    """`tool_choice` naming the function the model must call."""

    type: Literal["function"]
    function: NamedFunction


class StreamOptions(_Strict):
    """`stream_options`: whether to send a final usage chunk, and usage in every chunk."""

    include_usage: bool = False
    continuous_usage_stats: bool = Field(
        False, description="vLLM's: with include_usage, every chunk also carries usage so far."
    )
    include_obfuscation: bool | None = Field(
        None, description="Accepted, not used: it pads chunks, and cannot change the reply."
    )


class JsonSchemaFormat(_Strict):
    """`response_format.json_schema`: the schema a JSON reply must follow."""

    name: str = Field(max_length=64)
    description: str | None = None
    schema_: dict[str, Any] = Field(default_factory=dict, alias="schema")
    strict: bool | None = Field(
        None,
        description="Absent or true: an object admits only the properties it names (as vLLM's "
        "xgrammar and OpenAI's strict mode); false: the schema is read literally.",
    )

    model_config = ConfigDict(extra="forbid", populate_by_name=True)


class ResponseFormat(_Strict):
    """`response_format`: free text, any JSON object, or JSON following a schema."""

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_given(self) -> ResponseFormat:
        if self.type == "json_schema" and self.json_schema is None:
            raise ValueError("type 'json_schema' needs a 'json_schema' object")
        return self

    def constrained(self) -> bool:
        """Whether the reply must be JSON."""
        return self.type != "text"

    def target_schema(self) -> dict[str, Any] | None:
        """The schema the reply follows; None = any JSON object."""
        return self.json_schema.schema_ if self.json_schema is not None else None

    def reads_strictly(self) -> bool:
        """Whether the schema admits only what it names (the default; `strict: false` reads it
        literally)."""
        return self.json_schema is None or self.json_schema.strict is not False


MAX_TOP_LOGPROBS = 20
MAX_CHOICES = 128  # OpenAI's bound on `n`; the server's own (LLM_MAX_CHOICES) is lower


class SamplingRequest(_Strict):
    """What every generation request carries: length, sampling and streaming. A field the
    server does not know is refused (`extra="forbid"`, so the published schema says so too);
    the last ones, which cannot change the output, are accepted and not used."""

    model: str | None = None
    max_tokens: int | None = Field(None, ge=1)
    n: int = Field(
        1,
        ge=1,
        le=MAX_CHOICES,
        description="Choices to generate from the prompt (whose KV they share where the engine "
        "can copy it); at most the server's LLM_MAX_CHOICES and LLM_MAX_BATCH_SIZE.",
    )
    seed: int | None = None
    stop: StopText | Annotated[list[StopText], Field(max_length=MAX_STOP_SEQUENCES)] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    logit_bias: LogitBias | None = Field(
        None, description="Token id (as a string) -> bias added to its logit."
    )
    # vLLM's extensions: `top_k` (0 or -1 = no cut), `min_p`, `repetition_penalty`, and
    # `ignore_eos` (generate to max_tokens: benchmarks, and tests that need a long reply).
    top_k: int = Field(0, ge=-1)
    min_p: float = Field(0.0, ge=0.0, le=1.0)
    repetition_penalty: float = Field(1.0, gt=0.0, le=10.0)
    ignore_eos: bool = False
    # Accepted, never used: they cannot change the reply. (Open WebUI sends `user` as an object.)
    user: str | dict[str, Any] | None = None
    metadata: dict[str, str] | None = None
    store: bool | None = None
    service_tier: str | None = None
    prompt_cache_key: str | None = None
    safety_identifier: str | None = None

    def requested_max_tokens(self) -> int | None:
        """The longest reply asked for; None = the server's default."""
        return self.max_tokens

    def wants_usage_chunk(self) -> bool:
        """Whether a streamed response ends with a usage chunk."""
        return bool(self.stream_options and self.stream_options.include_usage)

    def wants_continuous_usage(self) -> bool:
        """Whether every chunk of a streamed response carries the usage so far (vLLM's)."""
        options = self.stream_options
        return bool(options and options.include_usage and options.continuous_usage_stats)

    def logprobs_asked(self) -> int | None:
        """How many alternatives per token the reply reports; None = no log-probabilities."""
        return None

    def to_sampling_params(self, max_tokens: int, grammar: str | None = None) -> SamplingParams:
        """Engine sampling parameters, with `max_tokens` resolved and a grammar (from
        `response_format`) compiled by the server."""
        stops = [self.stop] if isinstance(self.stop, str) else self.stop or []
        return SamplingParams(
            max_tokens=max_tokens,
            temperature=self.temperature,
            top_p=self.top_p,
            stop=tuple(stops),
            seed=self.seed,
            ignore_eos=self.ignore_eos,
            presence_penalty=self.presence_penalty,
            frequency_penalty=self.frequency_penalty,
            repetition_penalty=self.repetition_penalty,
            top_k=max(self.top_k, 0),
            min_p=self.min_p,
            logit_bias=tuple(sorted((int(t), b) for t, b in (self.logit_bias or {}).items())),
            logprobs=self.logprobs_asked(),
            grammar=grammar,
            n=self.n,
        )


class ChatCompletionRequest(SamplingRequest):
    """`POST /v1/chat/completions` body."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    response_format: ResponseFormat | None = None
    tools: list[ToolDef] | None = Field(None, max_length=128)
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool = True

    @model_validator(mode="after")
    def _consistent(self) -> ChatCompletionRequest:
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs set to true")
        constrained = self.uses_tools() or bool(
            self.response_format and self.response_format.constrained()
        )
        if self.ignore_eos and constrained:
            raise ValueError("ignore_eos cannot be combined with a JSON reply or tool calls")
        if self.stop and constrained:  # a stop string inside the JSON would cut it unparsable
            raise ValueError(
                "stop cannot be combined with a JSON reply or tools: the grammar ends the reply"
            )
        if self.tool_choice not in (None, "none") and not self.tools:
            raise ValueError("tool_choice needs tools")
        if isinstance(self.tool_choice, NamedToolChoice) and self.tool_choice.function.name not in {
            tool.function.name for tool in self.tools or []
        }:
            raise ValueError("tool_choice names a function that is not in tools")
        if self.uses_tools() and self.response_format and self.response_format.constrained():
            raise ValueError(
                "response_format cannot be combined with tools (unless tool_choice is 'none')"
            )
        return self

    def uses_tools(self) -> bool:
        """Whether the reply may or must call tools (tools sent, and tool_choice not `none`)."""
        return bool(self.tools) and self.tool_choice != "none"

    def requested_max_tokens(self) -> int | None:
        """`max_completion_tokens` (current OpenAI name) or `max_tokens` (legacy)."""
        return self.max_completion_tokens or self.max_tokens

    def logprobs_asked(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None


def _a_bool(value: Any) -> Any:
    """JSON's `false` only: a Literal[False] alone takes 0, which equals False in Python."""
    if not isinstance(value, bool):
        raise ValueError("must be a boolean")
    return value


class CompletionRequest(SamplingRequest):
    """`POST /v1/completions` body (OpenAI's legacy text completion): one text prompt."""

    prompt: PromptText | Annotated[list[PromptText], Field(min_length=1, max_length=1)] = Field(
        description="The text to continue (or a list of one text)."
    )
    # OpenAI's default for this route, unlike chat's.
    max_tokens: int | None = Field(16, ge=1)
    echo: Annotated[Literal[False], BeforeValidator(_a_bool)] = Field(
        False, description="Echoing the prompt is not supported."
    )
    suffix: None = Field(None, description="Insertion (a suffix) is not supported.")
    best_of: int | None = Field(
        None, ge=1, description="Candidates per choice returned: only n (each one) is supported."
    )
    logprobs: None = Field(None, description="Use /v1/chat/completions for log-probabilities.")

    @field_validator("best_of")
    @classmethod
    def _every_candidate_returned(cls, best_of: int | None, info: ValidationInfo) -> int | None:
        n = info.data.get("n", 1)
        if best_of is not None and best_of != n:
            raise ValueError(f"best_of must equal n ({n}): choosing among candidates is not done")
        return best_of

    def text(self) -> str:
        """The prompt as one string."""
        return self.prompt if isinstance(self.prompt, str) else self.prompt[0]


GenerationRequest = ChatCompletionRequest | CompletionRequest


class TokenizeRequest(_Strict):
    """vLLM's `POST /tokenize`: a text prompt, or chat messages through the chat template."""

    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = Field(None, min_length=1)

    @model_validator(mode="after")
    def _one_input(self) -> TokenizeRequest:
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give either 'prompt' or 'messages'")
        return self


class TokenizeResponse(BaseModel):
    """Token ids of the input, their count and the model's context window."""

    count: int
    max_model_len: int
    tokens: list[int]


class DetokenizeRequest(_Strict):
    """vLLM's `POST /detokenize`: token ids back to text."""

    model: str | None = None
    tokens: list[Annotated[int, Field(ge=0)]] = Field(max_length=1_000_000)


class DetokenizeResponse(BaseModel):
    """The text of the token ids."""

    prompt: str


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


class TopLogprob(BaseModel):
    """One candidate token and its log-probability."""

    token: str
    logprob: float
    bytes: list[int]


class TokenLogprobs(TopLogprob):
    """A generated token's log-probability, and the most likely tokens at its position."""

    top_logprobs: list[TopLogprob]


class ChoiceLogprobs(BaseModel):
    """`choices[].logprobs`: one entry per generated token."""

    content: list[TokenLogprobs]

    @classmethod
    def of(cls, entries: list[TokenLogprob]) -> ChoiceLogprobs:
        """The wire form of the loop's entries."""
        return cls(
            content=[
                TokenLogprobs(
                    **_candidate(entry.token, entry.logprob),
                    top_logprobs=[TopLogprob(**_candidate(t, lp)) for t, lp in entry.top],
                )
                for entry in entries
            ]
        )


def _candidate(token: str, logprob: float) -> dict[str, Any]:
    return {"token": token, "logprob": logprob, "bytes": list(token.encode("utf-8"))}


class ResponseMessage(BaseModel):
    """The assistant's message in a non-streamed response: text, or the tool calls it made."""

    role: Literal["assistant"] = "assistant"
    content: str | None
    tool_calls: list[ToolCall] | None = None

    @model_serializer(mode="wrap")
    def _without_absent_calls(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        data: dict[str, Any] = handler(self)
        if data.get("tool_calls") is None:  # as OpenAI: no key when no calls were made
            data.pop("tool_calls", None)
        return data


class Choice(BaseModel):
    """A choice of a non-streamed response."""

    index: int = 0
    message: ResponseMessage
    finish_reason: str | None
    logprobs: ChoiceLogprobs | None = None


class ChatCompletionResponse(BaseModel):
    """A whole (non-streamed) chat completion."""

    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[Choice]
    usage: Usage


class ToolCallDelta(ToolCall):
    """A tool call in a stream chunk, with its place among the message's calls."""

    index: int


class DeltaMessage(BaseModel):
    """What one stream chunk adds to the assistant's message."""

    role: Literal["assistant"] | None = None
    content: str | None = None
    tool_calls: list[ToolCallDelta] | None = None


class ChunkChoice(BaseModel):
    """A choice's part of a stream chunk."""

    index: int = 0
    delta: DeltaMessage
    finish_reason: str | None = None
    logprobs: ChoiceLogprobs | None = None


class ChatCompletionChunk(BaseModel):
    """One server-sent event of a streamed chat completion."""

    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChunkChoice]
    usage: Usage | None = None


class CompletionChoice(BaseModel):
    """A choice of a text completion, whole or one chunk of its stream."""

    index: int = 0
    text: str
    logprobs: None = None
    finish_reason: str | None = None


class CompletionResponse(BaseModel):
    """`POST /v1/completions`: a whole text completion, or one chunk of a streamed one."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class ErrorBody(BaseModel):
    """What went wrong, in OpenAI's error shape."""

    message: str
    type: str
    param: str | None
    code: str | None


class ErrorResponse(BaseModel):
    """Every error response's body."""

    error: ErrorBody


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


class HealthStatus(BaseModel):
    """`GET /healthz`: `ok` and the model, or why no replica can serve (`loading`,
    `unavailable`)."""

    status: Literal["ok", "loading", "unavailable"]
    model: str | None = None
    error: str | None = None


def completion_id() -> str:
    """A fresh response id."""
    return f"chatcmpl-{uuid.uuid4().hex}"


def now() -> int:
    """Unix time in seconds, as OpenAI's `created`."""
    return int(time.time())


def validation_param(loc: tuple[Any, ...]) -> str | None:
    """OpenAI-style `param` (`messages.0.content`) from a pydantic error location."""
    parts = [str(p) for p in loc if p not in ("body", "query")]
    # Union members add their type's name to the location (`str`, `list[ContentPart]`,
    # `constrained-str`); it names no field.
    parts = [p for p in parts if not _UNION_MEMBER.fullmatch(p)]
    return ".".join(parts) or None


_UNION_MEMBER = re.compile(r"str|int|ContentPart|constrained-\w+|[\w-]+\[.*\]")
