"""Native tool-call formats: which templates have one, and the lazy grammar that lets the reply
run free until the format's opening, then holds the call to its schema."""

from __future__ import annotations

import copy
import json
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import torch
from transformers import PreTrainedTokenizerBase

from backend.engines.embedded import embedded_gguf_path
from backend.engines.gguf_tokenizer import load_gguf_tokenizer
from backend.engines.llamacpp import LlamaCppEngine
from backend.ingress.serving import ChatService, start_generation
from backend.protocol import ChatCompletionRequest, ChatCompletionResponse
from backend.replica.model_server import ModelServer
from backend.settings import BackendSettings
from backend.structured import Constraint
from backend.tool_formats import HERMES, native_format, partial_suffix
from backend.tools import conversation, native_grammar
from tests.backend.test_structured import grammar_accepts, grammar_view
from tests.backend.test_tools import WEATHER

HERMES_FILE = Path(__file__).parents[1] / "fixtures" / "hermes_tools.jinja"
HERMES_TEMPLATE = HERMES_FILE.read_text()


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerBase:
    return load_gguf_tokenizer(embedded_gguf_path(), BackendSettings().cache_dir)


def with_template(tokenizer: PreTrainedTokenizerBase, template: str) -> PreTrainedTokenizerBase:
    changed = copy.deepcopy(tokenizer)
    changed.chat_template = template
    return changed


def test_a_template_that_writes_tool_call_tags_has_the_hermes_format(
    tokenizer: PreTrainedTokenizerBase,
) -> None:
    assert native_format(tokenizer) is None  # SmolLM2's template has no tools
    assert native_format(with_template(tokenizer, HERMES_TEMPLATE)) is HERMES


def test_a_marker_that_is_a_special_token_is_not_used(tokenizer: PreTrainedTokenizerBase) -> None:
    """Special tokens are left out of the reply's text: calls could not be told from text."""
    special = with_template(tokenizer, HERMES_TEMPLATE)
    special.add_special_tokens({"additional_special_tokens": ["<tool_call>"]})
    assert native_format(special) is None


def weather_grammar(**fields: object) -> str:
    body = {"messages": [{"role": "user", "content": "Paris?"}], "tools": [WEATHER], **fields}
    return native_grammar(HERMES, ChatCompletionRequest.model_validate(body))


CALL = '<tool_call>\n{"name":"get_weather","arguments":{"city":"Paris"}}\n</tool_call>'


@pytest.mark.parametrize(
    ("text", "allowed"),
    [
        ("It is sunny in Paris.", True),  # free text, no call
        ("Let me look that up." + CALL, True),
        (CALL + CALL, True),  # several calls
        ('<tool_call>\n{"name":"get_weather","arguments":{"town":"Paris"}}\n</tool_call>', False),
        ('<tool_call>\n{"name":"get_time","arguments":{}}\n</tool_call>', False),
        (
            '<tool_call>\n{"name":"get_weather","arguments":{"city":"Paris","x":1}}\n</tool_call>',
            False,
        ),
    ],
)
def test_the_reply_runs_free_until_the_opening_then_follows_the_schema(
    tokenizer: PreTrainedTokenizerBase, text: str, allowed: bool
) -> None:
    assert grammar_accepts(tokenizer, weather_grammar(), text) is allowed


def test_parallel_tool_calls_false_allows_one_call(tokenizer: PreTrainedTokenizerBase) -> None:
    one = weather_grammar(parallel_tool_calls=False)
    assert grammar_accepts(tokenizer, one, "Sure." + CALL)
    assert not grammar_accepts(tokenizer, one, CALL + CALL)


def test_past_calls_are_shown_as_the_template_writes_them() -> None:
    call = {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": "{}"}}
    body = {
        "messages": [
            {"role": "user", "content": "Paris?"},
            {"role": "assistant", "tool_calls": [call]},
            {"role": "tool", "tool_call_id": "c1", "content": "sunny"},
        ]
    }
    messages = ChatCompletionRequest.model_validate(body).messages
    shown = conversation(messages, tools=None, native=HERMES)[1]["content"]
    assert shown == '<tool_call>\n{"name": "get_weather", "arguments": {}}\n</tool_call>'


@pytest.mark.parametrize("seed", range(4))
def test_once_opened_any_call_the_grammar_allows_follows_the_schema(
    tokenizer: PreTrainedTokenizerBase, seed: int
) -> None:
    """Random tokens after the opening (uniform logits, masked): always a whole, valid call."""
    constraint = Constraint(grammar_view(tokenizer), weather_grammar())
    for token in tokenizer.encode("Checking. <tool_call>", add_special_tokens=False):
        constraint.advance(token)
    draws, tokens = torch.Generator().manual_seed(seed), []
    while "</tool_call>" not in tokenizer.decode(tokens):
        logits = torch.rand(len(tokenizer), generator=draws)
        constraint.mask(logits)
        tokens.append(int(logits.argmax()))
        constraint.advance(tokens[-1])
        assert len(tokens) < 200
    body = tokenizer.decode(tokens).split("</tool_call>")[0]
    call = json.loads(body)
    assert call["name"] == "get_weather" and set(call["arguments"]) == {"city"}


def test_what_could_begin_the_opening_is_measured() -> None:
    assert partial_suffix("Hello <tool", "<tool_call>") == 5
    assert partial_suffix("Hello <", "<tool_call>") == 1
    assert partial_suffix("Hello", "<tool_call>") == 0


@pytest.fixture(scope="module")
async def hermes_server() -> AsyncIterator[ModelServer]:
    """The real llama.cpp engine on the embedded model, with a Hermes-style template."""
    settings = BackendSettings(
        max_context_len=2048, max_batch_size=2, cpu_threads=1, chat_template=HERMES_FILE
    )
    server = ModelServer(settings, LlamaCppEngine)
    await server.start()
    yield server
    server.shutdown()


async def test_on_the_real_engine_the_template_lists_the_tools_and_the_reply_is_read_back(
    hermes_server: ModelServer,
) -> None:
    """Real tokens under the lazy grammar: text that ends by itself, or calls that validate."""
    body = {"messages": [{"role": "user", "content": "Weather in Paris?"}], "tools": [WEATHER]}
    request = ChatCompletionRequest.model_validate({**body, "max_tokens": 120, "seed": 2})
    first, events = await start_generation(hermes_server, request)
    assert first.tool_format == "hermes"
    await events.aclose()
    engine = hermes_server._engine
    prompt = engine.decode(engine.encode_chat(body["messages"], [WEATHER]))  # type: ignore[arg-type]
    assert "You may call these functions" in prompt and "get_weather" in prompt
    response = await ChatService(hermes_server).create(request)
    assert isinstance(response, ChatCompletionResponse)
    choice = response.choices[0]
    if choice.finish_reason == "tool_calls":
        for call in choice.message.tool_calls or []:
            assert call.function.name == "get_weather"
            assert set(json.loads(call.function.arguments)) == {"city"}
    else:
        assert choice.message.content and choice.finish_reason in ("stop", "length")
