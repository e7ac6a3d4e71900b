"""What every tokenizer-based engine shares: chat templates, on Mistral's own format."""

from __future__ import annotations

import pytest
from transformers import PreTrainedTokenizerBase

from backend.engines.llamacpp import LlamaCppEngine
from backend.engines.llamacpp_runner import N_BATCH
from backend.engines.runner_engine import LoadedModel, RunnerEngine, context_window
from backend.errors import InvalidRequestError
from backend.settings import BackendSettings


@pytest.fixture
def engine(mistral_tokenizer: PreTrainedTokenizerBase) -> RunnerEngine:
    """An engine with Mistral-7B-Instruct-v0.2's tokenizer format and no model behind it."""

    class TemplateOnly(RunnerEngine):
        name = "template-only"

        def _load(self) -> LoadedModel:
            raise AssertionError("not started in these tests")

    engine = TemplateOnly(BackendSettings())
    engine._loaded = LoadedModel("tiny-mistral", mistral_tokenizer, None, 256, frozenset({2}))
    return engine


def prompt(engine: RunnerEngine, messages: list[dict[str, str]]) -> str:
    return engine._model().tokenizer.decode(engine.encode_chat(messages))


def test_mistral_template_formats_the_whole_conversation(engine: RunnerEngine) -> None:
    messages = [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "Bye"},
    ]
    assert prompt(engine, messages) == "<s>[INST] Hi [/INST]Hello!</s>[INST] Bye [/INST]"


def test_system_prompt_is_merged_into_the_first_user_turn(engine: RunnerEngine) -> None:
    """v0.2's template has no system role: the prompt goes in front of the first question."""
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "Bye"},
    ]
    assert prompt(engine, messages) == (
        "<s>[INST] Be brief.\n\nHi [/INST]Hello!</s>[INST] Bye [/INST]"
    )


@pytest.mark.parametrize(
    "messages",
    [
        [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}],
        [{"role": "assistant", "content": "a"}],
    ],
)
def test_roles_that_do_not_alternate_are_a_clear_400(
    engine: RunnerEngine, messages: list[dict[str, str]]
) -> None:
    with pytest.raises(InvalidRequestError, match="alternate") as raised:
        engine.encode_chat(messages)
    assert raised.value.param == "messages"


class NoSystemRole:
    """A chat template without a system role that lets the assistant speak first: the prompt is
    each message's text, one token per character."""

    def apply_chat_template(self, messages: list[dict[str, str]], **_: object) -> list[int]:
        if any(m["role"] == "system" for m in messages):
            raise ValueError("System role not supported")
        return [ord(c) for m in messages for c in m["content"]]


@pytest.mark.parametrize(
    "messages",
    [
        [{"role": "system", "content": "s"}, {"role": "assistant", "content": "a"}],
        [
            {"role": "system", "content": "s"},
            {"role": "assistant", "content": "a"},
            {"role": "user", "content": "u"},
        ],
        [{"role": "system", "content": "s"}],
    ],
)
def test_a_system_prompt_with_no_user_message_after_it_is_a_400_never_dropped(
    engine: RunnerEngine, messages: list[dict[str, str]]
) -> None:
    engine._loaded = LoadedModel("no-system", NoSystemRole(), None, 256, frozenset())
    with pytest.raises(InvalidRequestError, match="system prompt") as raised:
        engine.encode_chat(messages)
    assert raised.value.param == "messages"


def test_context_window_is_the_setting_capped_by_training() -> None:
    assert context_window(8192, 0) == 8192
    assert context_window(8192, 1024) == 1024
    assert context_window(8192, 32768) == 8192
    assert context_window(0, 1024) == 1024  # the model does not say
    assert context_window(0, 0) == 2048


def test_llamacpp_takes_its_batch_when_nothing_decodes_unless_the_setting_caps_steps() -> None:
    assert LlamaCppEngine(BackendSettings()).idle_token_budget() == N_BATCH
    capped = LlamaCppEngine(BackendSettings(max_num_batched_tokens=64))
    assert capped.idle_token_budget() is None  # the setting caps every step
