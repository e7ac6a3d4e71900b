"""Pydantic models of the shapes instructor and LangChain send as JSON Schemas: nested models
(`$defs` and `$ref`), lists of models, enums, optional fields with defaults, unions, and a
recursive model. Their schemas carry no `additionalProperties`, as pydantic writes them."""

from __future__ import annotations

from enum import Enum
from typing import Annotated, Any, Literal

from pydantic import BaseModel, Field


class Priority(str, Enum):
    low = "low"
    high = "high"


class Task(BaseModel):
    title: str = Field(max_length=20)
    priority: Priority
    done: bool = False


class Owner(BaseModel):
    name: str = Field(max_length=12)
    email: str | None = Field(None, max_length=20)


class Project(BaseModel):
    """A nested model: a model field, a list of models, an enum inside them, an optional."""

    name: str = Field(max_length=12)
    owner: Owner
    tasks: list[Task] = Field(max_length=3)
    budget: int | None = Field(None, ge=0, le=1000)


class Team(BaseModel):
    """Nested, a list of models, optionals: no enum, which instructor's partial models in TOOLS
    mode validate strictly (a JSON string is not an `Enum` instance there)."""

    name: str = Field(max_length=12)
    lead: Owner
    members: list[Owner] = Field(max_length=3)


class Cat(BaseModel):
    kind: Literal["cat"]
    lives: int = Field(ge=0, le=9)


class Dog(BaseModel):
    kind: Literal["dog"]
    good: bool


class Pet(BaseModel):
    """A discriminated union (pydantic writes `oneOf` with a `discriminator`)."""

    pet: Cat | Dog = Field(discriminator="kind")
    nickname: Annotated[str, Field(max_length=8)] | Annotated[int, Field(ge=0, le=99)]


class Node(BaseModel):
    """A recursive model: `$ref` to itself through a list."""

    label: str = Field(max_length=8)
    children: list[Node] = Field(default_factory=list, max_length=2)


MODELS: list[type[BaseModel]] = [Task, Project, Team, Pet, Node]


def schema_of(model: type[BaseModel]) -> dict[str, Any]:
    """The JSON Schema pydantic writes for `model`, as the clients send it."""
    return model.model_json_schema()


def follows_exactly(model: type[BaseModel], value: Any) -> bool:
    """Whether `value` validates as `model` with no key the model does not name, at any depth:
    pydantic drops unknown keys, so the dump of what was given equals `value` only without
    them. A value that does not validate raises."""
    parsed = model.model_validate(value)
    return parsed.model_dump(mode="json", exclude_unset=True) == value
