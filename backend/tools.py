"""Tool calls on any model, as vLLM does for `tool_choice` `required` or a named function: the
reply is constrained by a grammar to JSON calls whose arguments follow each function's schema,
then parsed back into OpenAI's `tool_calls`. (`auto` would need a parser of each model's own
tool-call syntax; it is refused when the request is validated.)

Chat templates without a tool role (Mistral v0.2's, SmolLM2's) get the tool traffic as text, by
this documented rendering: the functions are listed in a system message; an assistant turn that
called tools reads `{"tool_calls": [{"name": …, "arguments": {…}}]}`; a `tool` message becomes a
user message `Result of tool call <id>: <content>` (consecutive results in one message).
"""

from __future__ import annotations

import json
import uuid
from typing import Any

from backend.protocol import (
    ChatCompletionRequest,
    ChatMessage,
    FunctionCall,
    NamedToolChoice,
    ToolCall,
    ToolDef,
)
from backend.structured import json_grammar

# At most this many calls in one reply (`parallel_tool_calls`): a reply always has an end.
MAX_PARALLEL_CALLS = 8


def conversation(messages: list[ChatMessage], tools: list[ToolDef] | None) -> list[dict[str, str]]:
    """The messages as role/content dicts for a chat template, tool traffic rendered as text."""
    rendered: list[dict[str, str]] = []
    after_tool = False  # the last message rendered holds tool results
    for message in messages:
        if message.role == "tool":
            result = f"Result of tool call {message.tool_call_id}: {message.text()}"
            if after_tool:
                rendered[-1]["content"] += "\n" + result
            else:
                rendered.append({"role": "user", "content": result})
            after_tool = True
            continue
        after_tool = False
        if message.tool_calls:
            calls = [_call_json(call) for call in message.tool_calls]
            text = (message.text() + "\n" if message.text() else "") + json.dumps(
                {"tool_calls": calls}, ensure_ascii=False
            )
            rendered.append({"role": "assistant", "content": text})
        else:
            rendered.append({"role": message.role, "content": message.text()})
        if message.name is not None:  # templates that know names use them (as in vLLM)
            rendered[-1]["name"] = message.name
    return _with_tool_list(rendered, tools) if tools else rendered


def request_conversation(request: ChatCompletionRequest) -> list[dict[str, str]]:
    """A chat request's conversation for the template (the tools listed unless `none`)."""
    tools = request.tools if request.tool_choice != "none" else None
    return conversation(request.messages, tools)


def tools_grammar(request: ChatCompletionRequest) -> str:
    """The grammar of the calls the request requires."""
    tools = request.tools or []
    choice = request.tool_choice
    if isinstance(choice, NamedToolChoice):
        tools = [tool for tool in tools if tool.function.name == choice.function.name]
    calls = [_call_schema(tool) for tool in tools]
    one = calls[0] if len(calls) == 1 else {"anyOf": calls}
    most = MAX_PARALLEL_CALLS if request.parallel_tool_calls else 1
    schema = {
        "type": "object",
        "properties": {
            "tool_calls": {"type": "array", "items": one, "minItems": 1, "maxItems": most}
        },
        "required": ["tool_calls"],
        "additionalProperties": False,
    }
    return json_grammar(schema, param="tools")


def parse_calls(text: str) -> list[ToolCall]:
    """The calls in a reply the grammar constrained (and that ended by itself)."""
    calls = json.loads(text)["tool_calls"]
    return [
        ToolCall(
            id=f"call_{uuid.uuid4().hex[:24]}",
            function=FunctionCall(
                name=call["name"], arguments=json.dumps(call["arguments"], ensure_ascii=False)
            ),
        )
        for call in calls
    ]


def _call_schema(tool: ToolDef) -> dict[str, Any]:
    return {
        "type": "object",
        "properties": {
            "name": {"const": tool.function.name},
            "arguments": tool.function.parameters,
        },
        "required": ["name", "arguments"],
        "additionalProperties": False,
    }


def _call_json(call: ToolCall) -> dict[str, Any]:
    try:
        arguments: Any = json.loads(call.function.arguments)
    except json.JSONDecodeError:
        arguments = call.function.arguments
    return {"name": call.function.name, "arguments": arguments}


def _with_tool_list(messages: list[dict[str, str]], tools: list[ToolDef]) -> list[dict[str, str]]:
    listed = [tool.function.model_dump(exclude_none=True, exclude={"strict"}) for tool in tools]
    note = (
        "You can call these functions. To call them, reply with JSON only: "
        '{"tool_calls": [{"name": <function name>, "arguments": {<arguments>}}]}.\n'
        "Functions: " + json.dumps(listed, ensure_ascii=False)
    )
    if messages and messages[0]["role"] in ("system", "developer"):
        first = {**messages[0], "content": messages[0]["content"] + "\n\n" + note}
        return [first, *messages[1:]]
    return [{"role": "system", "content": note}, *messages]
