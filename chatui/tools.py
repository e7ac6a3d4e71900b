"""Tool calls in the UI: the Tools setting read into a request's `tools` and `tool_choice`, and
the calls a reply makes, as OpenAI's wire format has them.

With tools, the tool choice says whether the model decides between answering and calling
(`auto`, OpenAI's default), must call one of them (`required`) or one named function. The message
the user sends after a call is its result: it goes to the backend as one `tool` message per call of
that reply (OpenAI requires every call answered before the conversation goes on; see
`chatui.conversation.to_openai`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

AUTO = "auto"  # the model answers, or calls any of the functions: it decides
REQUIRED = "required"  # the model calls any of the functions
MODES = (AUTO, REQUIRED)  # the tool choices that name no function


class ToolsError(ValueError):
    """Raised when the Tools setting cannot be sent: not JSON, not a list of functions, a tool
    choice it does not define, or combined with JSON output. The message says what to fix."""


class FunctionCall(BaseModel):
    """The function a call names and its arguments (a JSON text, as the model wrote them)."""

    name: str
    arguments: str


class ToolCall(BaseModel):
    """One call of an assistant message, in OpenAI's wire format."""

    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class _Function(BaseModel):
    model_config = ConfigDict(extra="allow")  # description, strict…: the backend judges them

    name: str = Field(min_length=1)
    parameters: dict[str, Any] | None = None


class _Tool(BaseModel):
    model_config = ConfigDict(extra="allow")

    type: Literal["function"]
    function: _Function


_TOOLS = TypeAdapter(list[_Tool])


@dataclass(frozen=True)
class ToolRequest:
    """The functions the model may call, as the user wrote them, and which it must call."""

    tools: tuple[dict[str, Any], ...]
    choice: str  # AUTO, REQUIRED, or the name of one of the functions

    def body(self) -> dict[str, Any]:
        """The request fields `tools` and `tool_choice`."""
        choice: Any = self.choice
        if choice not in MODES:
            choice = {"type": "function", "function": {"name": choice}}
        return {"tools": list(self.tools), "tool_choice": choice}


def tool_request(text: str, choice: str, *, json_output: bool = False) -> ToolRequest | None:
    """The Tools setting's JSON read into a request; None when it is empty or `[]` (a plain
    chat). Raises `ToolsError` with what to fix."""
    tools = _load(text)
    names = _names(tools)
    if not names:
        return None
    if choice not in MODES and choice not in names:
        raise ToolsError(
            f"The tool choice {choice!r} is not a function of Tools: pick {AUTO!r}, "
            f"{REQUIRED!r} or one of {', '.join(names)}."
        )
    if json_output:
        raise ToolsError("JSON output and tools cannot be combined: untick one or empty Tools.")
    return ToolRequest(tuple(tools), choice)


def tool_choices(text: str) -> list[str] | None:
    """The tool choices the Tools setting offers (`auto`, `required`, then each function's
    name); None when it cannot be read."""
    try:
        return [*MODES, *_names(_load(text))]
    except ToolsError:
        return None


def _load(text: str) -> Any:
    if not text.strip():
        return []
    try:
        return json.loads(text)
    except ValueError as exc:
        raise ToolsError(f"Tools is not valid JSON: {exc}.") from exc


def _names(tools: Any) -> list[str]:
    """The functions' names, once the value is checked to be a list of function tools."""
    try:
        parsed = _TOOLS.validate_python(tools)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in first["loc"])
        raise ToolsError(
            f'Tools must be a JSON list of {{"type": "function", "function": {{"name": …, '
            f'"parameters": {{…}}}}}} objects (tools{where}: {first["msg"]}).'
        ) from exc
    names = [tool.function.name for tool in parsed]
    if len(set(names)) < len(names):
        raise ToolsError(f"Tools defines a function name twice: {', '.join(names)}.")
    return names
