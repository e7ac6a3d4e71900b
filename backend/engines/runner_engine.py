"""The part every tokenizer-based engine shares: chat templates and the continuous-batching loop.

A concrete engine only loads its model (`_load`) and hands back a tokenizer and a `BatchRunner`.
"""

from __future__ import annotations

import logging
from abc import abstractmethod
from collections.abc import AsyncGenerator
from dataclasses import dataclass
from typing import Any, ClassVar

from backend.engines.base import Engine
from backend.errors import EngineError, InvalidRequestError
from backend.generation import Delta, SamplingParams
from backend.metrics import BatchGauges
from backend.replica.loop import ContinuousBatcher
from backend.replica.runner import BatchRunner
from backend.settings import BackendSettings
from backend.tool_formats import native_format

logger = logging.getLogger(__name__)


@dataclass
class LoadedModel:
    """What `_load` returns: everything the shared machinery needs to serve a model."""

    model_id: str
    tokenizer: Any  # a Hugging Face tokenizer (transformers 4.48 or 5)
    runner: BatchRunner
    context_window: int
    eos_ids: frozenset[int]


class RunnerEngine(Engine):
    """An engine = a Hugging Face tokenizer + a `BatchRunner` that `ContinuousBatcher` drives."""

    # Tokens per step when LLM_MAX_NUM_BATCHED_TOKENS is 0: what keeps running streams moving
    # while prompts arrive without starving the prompts, for this engine's costs.
    step_tokens: ClassVar[int] = 256
    # Tokens of a step in which no stream decodes (none to stall); None: `step_tokens`.
    idle_step_tokens: ClassVar[int | None] = None

    def __init__(self, settings: BackendSettings) -> None:
        super().__init__(settings)
        self._loaded: LoadedModel | None = None
        self._batcher: ContinuousBatcher | None = None

    @abstractmethod
    def _load(self) -> LoadedModel:
        """Load the model and tokenizer (blocking)."""

    @property
    def model_id(self) -> str:
        """The served model id: `LLM_SERVED_MODEL_NAME`, else the loaded model's own."""
        return self.settings.served_model_name or self._model().model_id

    @property
    def context_window(self) -> int:
        """The configured context length, capped by the model's own."""
        return self._model().context_window

    @property
    def batcher(self) -> ContinuousBatcher:
        """The running batching loop."""
        if self._batcher is None:
            raise EngineError("The engine has not been started.")
        return self._batcher

    def start(self) -> None:
        """Load the model and start the batching loop."""
        self._loaded = self._load()
        if self.settings.chat_template is not None:
            self._loaded.tokenizer.chat_template = self.settings.chat_template.read_text()
        self.tool_format = native_format(self._loaded.tokenizer)
        self.vocab_size = len(self._loaded.tokenizer)
        self._batcher = ContinuousBatcher(
            self._loaded.runner,
            self._loaded.tokenizer,
            self._loaded.eos_ids,
            token_budget=self.token_budget(),
            observer=BatchGauges(self.model_id),
            stream_interval_s=self.settings.stream_interval_ms / 1000,
            idle_token_budget=self.idle_token_budget(),
            stream_updates_per_s=self.settings.stream_updates_per_s,
        )
        self._batcher.start()
        logger.info("engine %s serving %s", self.name, self.model_id)

    def token_budget(self) -> int:
        """Tokens per step: the setting, or this engine's own, at least a batch's decode tokens."""
        configured = self.settings.max_num_batched_tokens
        return configured or max(self.step_tokens, self._model().runner.capacity)

    def idle_token_budget(self) -> int | None:
        """Tokens of a step without decode tokens: the engine's own, unless the setting caps
        every step."""
        return None if self.settings.max_num_batched_tokens else self.idle_step_tokens

    def encode_chat(
        self, messages: list[dict[str, str]], tools: list[dict[str, Any]] | None = None
    ) -> list[int]:
        """Apply the model's own chat template; templates without a system role get it merged."""
        try:
            return self._apply_template(messages, tools)
        except InvalidRequestError:
            if not messages or messages[0]["role"] not in ("system", "developer"):
                raise
            return self._apply_template(_merge_system_into_first_user(messages), tools)

    def encode_text(self, text: str) -> list[int]:
        """Token ids of plain text, BOS included where the tokenizer adds it."""
        return list(self._model().tokenizer(text)["input_ids"])

    def decode(self, token_ids: list[int]) -> str:
        """The text of token ids, without special tokens."""
        return str(self._model().tokenizer.decode(token_ids, skip_special_tokens=True))

    def generate(
        self, prompt_ids: list[int], params: SamplingParams
    ) -> AsyncGenerator[Delta, None]:
        """Stream the reply from the batching loop."""
        return self.batcher.stream(prompt_ids, params)

    def check_health(self) -> None:
        """Fail when the batching loop has died."""
        if not self.batcher.is_alive():
            raise EngineError("The batching loop has stopped.")

    def shutdown(self) -> None:
        """Stop the batching loop."""
        if self._batcher is not None:
            self._batcher.shutdown()

    def _model(self) -> LoadedModel:
        if self._loaded is None:
            raise EngineError("The engine has not been started.")
        return self._loaded

    def _apply_template(
        self, messages: list[dict[str, str]], tools: list[dict[str, Any]] | None
    ) -> list[int]:
        tokenizer = self._model().tokenizer
        try:
            ids = tokenizer.apply_chat_template(
                messages, tools=tools, add_generation_prompt=True, tokenize=True, return_dict=False
            )
        except Exception as exc:  # jinja2 raises TemplateError for e.g. non-alternating roles
            raise InvalidRequestError(
                f"The conversation does not fit the model's chat template: {exc}", param="messages"
            ) from exc
        return list(ids)


def context_window(native: int, configured: int) -> int:
    """Tokens per sequence: `LLM_MAX_CONTEXT_LEN`, capped by what the model was trained on
    (`native`, 0 when the model does not say; then the setting, else 2048)."""
    native = native or configured or 2048
    return min(configured, native) if configured else native


def _merge_system_into_first_user(messages: list[dict[str, str]]) -> list[dict[str, str]]:
    """The system prompt in front of the first user message; a conversation with no user message
    right after it is refused (the prompt is never dropped)."""
    system, rest = messages[0]["content"], messages[1:]
    if not rest or rest[0]["role"] != "user":
        raise InvalidRequestError(
            "This model's chat template has no system role, so the system prompt is put in front "
            "of the first user message; the message after it must be from the user.",
            param="messages",
        )
    first = {"role": "user", "content": f"{system}\n\n{rest[0]['content']}"}
    return [first, *rest[1:]]
