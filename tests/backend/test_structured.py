"""Structured output with llguidance on the embedded model's real tokenizer."""

from __future__ import annotations

import json

import llguidance
import pytest
import torch
from transformers import PreTrainedTokenizerBase

from backend.engines.embedded import embedded_gguf_path
from backend.engines.gguf_tokenizer import load_gguf_tokenizer
from backend.errors import InvalidRequestError
from backend.settings import BackendSettings
from backend.structured import Constraint, GrammarTokenizer, json_grammar

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "maxItems": 3},
    },
    "required": ["name", "age", "tags"],
    "additionalProperties": False,
}


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerBase:
    return load_gguf_tokenizer(embedded_gguf_path(), BackendSettings().cache_dir)


def grammar_view(tokenizer: PreTrainedTokenizerBase) -> llguidance.LLTokenizer:
    """llguidance's view of the tokenizer, made once per tokenizer (it takes about a second)."""
    key = id(tokenizer)
    if key not in _GRAMMAR_VIEWS:
        _GRAMMAR_VIEWS[key] = (
            tokenizer,
            GrammarTokenizer(tokenizer, [tokenizer.eos_token_id]).get(),
        )
    return _GRAMMAR_VIEWS[key][1]


_GRAMMAR_VIEWS: dict[int, tuple[PreTrainedTokenizerBase, llguidance.LLTokenizer]] = {}


def random_constrained_text(
    tokenizer: PreTrainedTokenizerBase, grammar: str, seed: int, masked: bool = True
) -> str:
    """Tokens drawn at random (uniform logits), masked by the grammar, until end of sequence."""
    eos = tokenizer.eos_token_id
    constraint = Constraint(grammar_view(tokenizer), grammar)
    draws = torch.Generator().manual_seed(seed)
    tokens: list[int] = []
    for _ in range(400):
        logits = torch.rand(len(tokenizer), generator=draws)
        if masked:
            constraint.mask(logits)
        token = int(logits.argmax())
        if token == eos:
            break
        tokens.append(token)
        if masked:
            constraint.advance(token)
    return tokenizer.decode(tokens)


def grammar_accepts(tokenizer: PreTrainedTokenizerBase, grammar: str, text: str) -> bool:
    """Whether the grammar allows `text`, token by token, and ends there."""
    matcher = llguidance.LLMatcher(grammar_view(tokenizer), grammar)
    tokens = tokenizer.encode(text, add_special_tokens=False)
    return matcher.consume_tokens(tokens) and matcher.is_accepting()


@pytest.mark.parametrize("seed", range(5))
def test_any_tokens_the_mask_allows_make_json_that_follows_the_schema(
    tokenizer: PreTrainedTokenizerBase, seed: int
) -> None:
    reply = json.loads(random_constrained_text(tokenizer, json_grammar(SCHEMA), seed))
    assert set(reply) == {"name", "age", "tags"} and len(reply["name"]) <= 12
    assert isinstance(reply["age"], int) and 0 <= reply["age"] <= 150
    assert set(reply["tags"]) <= {"a", "b"} and len(reply["tags"]) <= 3


def test_without_the_mask_random_tokens_are_not_json(tokenizer: PreTrainedTokenizerBase) -> None:
    """The check above can fail: the same draw, unmasked, does not parse."""
    with pytest.raises(json.JSONDecodeError):
        json.loads(random_constrained_text(tokenizer, json_grammar(SCHEMA), 0, masked=False))


def test_a_schema_llguidance_cannot_use_is_a_400_naming_the_field() -> None:
    with pytest.raises(InvalidRequestError) as raised:
        json_grammar({"type": "object", "properties": {"x": {"$ref": "#/nowhere"}}})
    assert raised.value.param == "response_format"


def test_a_copy_masks_as_its_original_and_then_goes_its_own_way(
    tokenizer: PreTrainedTokenizerBase,
) -> None:
    original = Constraint(grammar_view(tokenizer), json_grammar(SCHEMA))
    for token in tokenizer.encode('{"name":"', add_special_tokens=False):
        original.advance(token)
    twin = original.copy()
    masks = [torch.zeros(len(tokenizer)) for _ in range(2)]
    original.mask(masks[0])
    twin.mask(masks[1])
    assert torch.equal(masks[0], masks[1]) and bool(torch.isinf(masks[0]).any())
    for token in tokenizer.encode('Ada","age":', add_special_tokens=False):
        twin.advance(token)  # the twin moves on to the number; the original is in the string
    masks = [torch.zeros(len(tokenizer)) for _ in range(2)]
    original.mask(masks[0])
    twin.mask(masks[1])
    assert not torch.equal(masks[0], masks[1])
