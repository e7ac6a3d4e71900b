"""JSON Schemas as the reference servers read them: strict by default, references rebased."""

from __future__ import annotations

import json
from typing import Any

import pytest
from transformers import PreTrainedTokenizerBase

from backend.engines.embedded import embedded_gguf_path
from backend.engines.gguf_tokenizer import load_gguf_tokenizer
from backend.json_schema import rebased, strict
from backend.settings import BackendSettings
from backend.structured import json_grammar
from tests.backend.test_structured import grammar_accepts, random_constrained_text
from tests.client_models import MODELS, Project, follows_exactly, schema_of


def test_every_object_that_names_its_properties_is_closed() -> None:
    closed = strict(schema_of(Project))
    assert closed["additionalProperties"] is False
    assert all(
        d["additionalProperties"] is False for d in closed["$defs"].values() if "properties" in d
    )


def test_what_a_schema_says_of_other_keys_is_obeyed() -> None:
    open_map = {"type": "object", "additionalProperties": {"type": "integer"}}
    patterned = {"type": "object", "properties": {"a": {}}, "patternProperties": {"^x": {}}}
    explicit = {"type": "object", "properties": {"a": {}}, "additionalProperties": True}
    for schema in (open_map, patterned, explicit):
        assert strict(schema) == schema
    assert strict({"type": "object"}) == {"type": "object"}  # names nothing: any object


def test_a_tuple_admits_no_item_it_does_not_name() -> None:
    assert strict({"prefixItems": [{"type": "integer"}]})["items"] is False
    assert strict({"prefixItems": [{}], "items": {"type": "string"}})["items"] == {"type": "string"}


def test_the_parts_of_an_intersection_stay_open_for_each_other() -> None:
    parts = [{"properties": {"a": {}}}, {"properties": {"b": {}}}]
    closed = strict({"allOf": parts})
    assert closed["allOf"] == parts
    single = strict({"allOf": [{"properties": {"a": {}}}]})
    assert single["allOf"][0]["additionalProperties"] is False


def test_data_inside_a_schema_is_not_read_as_schema() -> None:
    data = {"properties": {"x": {}}, "$ref": "#/y"}
    schema = {"properties": {"a": {"const": data, "default": data, "enum": [data]}}}
    assert strict(schema)["properties"]["a"] == schema["properties"]["a"]
    assert rebased(schema, "/p")["properties"]["a"] == schema["properties"]["a"]


def test_local_references_follow_the_schema_where_it_is_placed() -> None:
    schema = {"$defs": {"T": {"type": "string"}}, "properties": {"t": {"$ref": "#/$defs/T"}}}
    moved = rebased(schema, "/properties/arguments")
    assert moved["properties"]["t"]["$ref"] == "#/properties/arguments/$defs/T"
    assert rebased({"items": {"$ref": "#"}}, "/a")["items"]["$ref"] == "#/a"
    remote = {"$ref": "https://example.com/s.json"}
    assert rebased(remote, "/a") == remote


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerBase:
    return load_gguf_tokenizer(embedded_gguf_path(), BackendSettings().cache_dir)


def draws(tokenizer: PreTrainedTokenizerBase, schema: dict[str, Any], strict_: bool) -> list[Any]:
    grammar = json_grammar(schema, strict=strict_)
    return [json.loads(random_constrained_text(tokenizer, grammar, seed)) for seed in range(6)]


@pytest.mark.parametrize("model", MODELS, ids=lambda m: m.__name__)
def test_any_reply_to_a_pydantic_schema_is_that_model_and_nothing_more(
    tokenizer: PreTrainedTokenizerBase, model: Any
) -> None:
    for value in draws(tokenizer, schema_of(model), strict_=True):
        assert follows_exactly(model, value), value


PROJECT = {"name": "p", "owner": {"name": "o"}, "tasks": [{"title": "t", "priority": "low"}]}
WITH_EXTRA_KEYS = [
    {**PROJECT, "age_min": 3},
    {**PROJECT, "owner": {"name": "o", "description": "x"}},
    {**PROJECT, "tasks": [{"title": "t", "priority": "low", "maxLength": 2}]},
]


def test_read_literally_the_same_schema_lets_other_keys_in(
    tokenizer: PreTrainedTokenizerBase,
) -> None:
    """The checks above can fail: `strict: false` reads pydantic's schema as written, and the
    grammar then takes keys the model does not name, at any depth."""
    literal = json_grammar(schema_of(Project), strict=False)
    strict_ = json_grammar(schema_of(Project))
    for value in WITH_EXTRA_KEYS:
        text = json.dumps(value, separators=(",", ":"))
        assert grammar_accepts(tokenizer, literal, text)
        assert not grammar_accepts(tokenizer, strict_, text)
    exact = json.dumps(PROJECT, separators=(",", ":"))
    assert grammar_accepts(tokenizer, strict_, exact)


BASE = {"properties": {"x": {"type": "integer"}}, "required": ["x"]}
EXTRA = {"properties": {"extra": {"type": "string"}}, "required": ["extra"]}


@pytest.mark.parametrize(
    "schema",
    [
        {"allOf": [{"$ref": "#/$defs/Base"}, EXTRA], "$defs": {"Base": BASE}},
        {**BASE, "allOf": [EXTRA]},
        {"$ref": "#/$defs/Base", **EXTRA, "$defs": {"Base": BASE}},
    ],
    ids=["allOf-of-a-reference", "allOf-beside-properties", "reference-beside-properties"],
)
def test_the_parts_of_an_intersection_admit_each_others_keys(
    tokenizer: PreTrainedTokenizerBase, schema: dict[str, Any]
) -> None:
    grammar = json_grammar(schema)  # a 400 ("unsatisfiable") when each part is closed
    assert grammar_accepts(tokenizer, grammar, '{"x":1,"extra":"e"}')
