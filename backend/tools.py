"""Tool calls on any model, in llama.cpp's generic format (`common/chat.cpp`,
`common_chat_params_init_generic`), for chat templates that have no tool-call format of their
own (Mistral v0.2's, SmolLM2's), and for `required` or a named function on every template:

- the functions are listed in a system message, which tells the model the reply's JSON form;
- the reply is constrained by a grammar: `{"tool_calls": [{"name": …, "arguments": {…}}]}` for
  `tool_choice` `required` or a named function (as vLLM does for those); for `auto` (also the
  default when tools are sent) either those calls or `{"response": "<text>"}`, so the model
  decides between calling and answering, as llama.cpp's generic handler lets it;
- `ReplyReader` reads the reply back: the response's text streams out as content while it is
  written, and the calls go out whole once the grammar has closed them.

Tool traffic in the conversation is rendered as text: an assistant turn that called tools reads
`{"tool_calls": [{"name": …, "arguments": {…}}]}` (in a template's own format, as its model
writes calls, when it has one); a `tool` message becomes a user message
`Result of tool call <id>: <content>` (consecutive results in one message).

Templates with a tool format of their own get the tools and a lazy grammar instead
(`native_grammar`), and `NativeReplyReader` reads their replies.
"""

from __future__ import annotations

import json
import re
import secrets
import string
from typing import Any, Literal

from backend.json_schema import rebased, strict
from backend.protocol import (
    ChatCompletionRequest,
    ChatMessage,
    FunctionCall,
    NamedToolChoice,
    ToolCall,
    ToolDef,
)
from backend.structured import json_grammar
from backend.tool_formats import NativeFormat, partial_suffix

# At most this many calls in one reply (`parallel_tool_calls`): a reply always has an end.
MAX_PARALLEL_CALLS = 8
ToolMode = Literal["none", "auto", "required"]
# Where a call's arguments lie in the grammar's schema (`_reply_schema`), for their `$ref`s.
_CALLS_POINTER = "/anyOf/0"
RESPONSE_OPENING = '{"response":"'  # compact JSON: the grammar allows no whitespace
_ALPHANUMERIC = string.ascii_letters + string.digits


def tool_mode(request: ChatCompletionRequest) -> ToolMode:
    """Whether the reply may not call tools, may, or must."""
    if not request.tools or request.tool_choice == "none":
        return "none"
    return "auto" if request.tool_choice in (None, "auto") else "required"


def conversation(
    messages: list[ChatMessage],
    tools: list[ToolDef] | None,
    mode: ToolMode = "required",
    native: NativeFormat | None = None,
) -> list[dict[str, str]]:
    """The messages as role/content dicts for a chat template, tool traffic rendered as text
    (past calls as the template's `native` format writes them, if it has one) and the
    functions (if any) listed with the reply's form (`mode`: `auto` or `required`)."""
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
            calls = _calls_text([_call_json(call) for call in message.tool_calls], native)
            text = (message.text() + "\n" if message.text() else "") + calls
            rendered.append({"role": "assistant", "content": text})
        else:
            rendered.append({"role": message.role, "content": message.text()})
        if message.name is not None:  # templates that know names use them (as in vLLM)
            rendered[-1]["name"] = message.name
    return _with_tool_list(rendered, tools, mode) if tools else rendered


def request_conversation(request: ChatCompletionRequest) -> list[dict[str, str]]:
    """A chat request's conversation for the template (the tools listed unless `none`)."""
    mode = tool_mode(request)
    return conversation(request.messages, request.tools if mode != "none" else None, mode)


def tools_grammar(request: ChatCompletionRequest) -> str:
    """The grammar of the reply a request with tools asks for: calls, or (`auto`) calls or a
    response."""
    schema = _reply_schema(request)
    if tool_mode(request) == "required":
        del schema["anyOf"][1]  # the response
    return json_grammar(schema, param="tools", strict=False)


def _reply_schema(request: ChatCompletionRequest) -> dict[str, Any]:
    """`{"anyOf": [calls, response]}`."""
    calls = call_schemas(request, _CALLS_POINTER + "/properties/tool_calls/items")
    array = {"type": "array", "items": calls[0] if len(calls) == 1 else {"anyOf": calls}}
    return {
        "anyOf": [
            _object(tool_calls={**array, "minItems": 1, "maxItems": most_calls(request)}),
            _object(response={"type": "string"}),
        ]
    }


def native_grammar(format_: NativeFormat, request: ChatCompletionRequest) -> str:
    """The lazy grammar of a reply in the template's own tool format (`auto`)."""
    return format_.grammar(call_schemas(request), most=most_calls(request))


def most_calls(request: ChatCompletionRequest) -> int:
    """How many calls one reply may make: one with `parallel_tool_calls: false` or a named
    function (as vLLM's grammar for it, and OpenAI, do), else `MAX_PARALLEL_CALLS`."""
    named = isinstance(request.tool_choice, NamedToolChoice)
    return MAX_PARALLEL_CALLS if request.parallel_tool_calls and not named else 1


def call_schemas(request: ChatCompletionRequest, pointer: str = "") -> list[dict[str, Any]]:
    """The schema of a call `{"name", "arguments"}` of each function the request allows; the
    arguments read strictly unless the function says `strict: false`, their references
    rebased for calls placed at `pointer` (in an `anyOf` when there are several)."""
    tools = request.tools or []
    choice = request.tool_choice
    if isinstance(choice, NamedToolChoice):
        tools = [tool for tool in tools if tool.function.name == choice.function.name]
    where = pointer + ("/anyOf/{}" if len(tools) > 1 else "") + "/properties/arguments"
    return [_call_schema(tool, where.format(i)) for i, tool in enumerate(tools)]


def _call_schema(tool: ToolDef, pointer: str) -> dict[str, Any]:
    parameters = tool.function.parameters
    if tool.function.strict is not False:
        parameters = strict(parameters)
    return _object(name={"const": tool.function.name}, arguments=rebased(parameters, pointer))


def _object(**properties: Any) -> dict[str, Any]:
    """An object schema with exactly these properties, in this order."""
    return {
        "type": "object",
        "properties": properties,
        "required": list(properties),
        "additionalProperties": False,
    }


def parse_calls(text: str, model_id: str = "") -> list[ToolCall]:
    """The calls in a reply the grammar constrained (and that ended by itself)."""
    return calls_of(json.loads(text)["tool_calls"], model_id)


def calls_of(calls: list[dict[str, Any]], model_id: str) -> list[ToolCall]:
    """OpenAI's `tool_calls` for calls read as `{"name", "arguments"}`, each with a new id."""
    return [
        ToolCall(
            id=new_call_id(model_id),
            function=FunctionCall(
                name=call["name"],
                arguments=valid_unicode(json.dumps(call["arguments"], ensure_ascii=False)),
            ),
        )
        for call in calls
    ]


def new_call_id(model_id: str) -> str:
    """A fresh tool-call id in the form the model's clients expect: 9 alphanumeric characters
    for Mistral models (their templates check it, and vLLM's Mistral parser makes them so),
    else OpenAI's `call_` and 24."""
    if "mistral" in model_id.lower():
        return _random_alphanumeric(9)
    return "call_" + _random_alphanumeric(24)


def _random_alphanumeric(length: int) -> str:
    return "".join(secrets.choice(_ALPHANUMERIC) for _ in range(length))


class ReplyReader:
    """Reads one choice's reply, in the form `tools_grammar` constrains it to, as it streams:
    `feed` the generated text, get the content to send now; `finish` gives the rest, the
    calls and the finish reason."""

    def __init__(self, mode: ToolMode, model_id: str) -> None:
        self._mode = mode
        self._model_id = model_id
        self._raw = ""
        self._read = len(RESPONSE_OPENING)  # where the response's undecoded text starts

    def feed(self, text: str) -> str:
        """The content that `text` completes: itself without tools, the response's text as
        far as it is written, nothing while calls are written."""
        if self._mode == "none":
            return text
        self._raw += text
        if not self._raw.startswith(RESPONSE_OPENING):
            return ""
        decoded, self._read = _decode_string(self._raw, self._read)
        return decoded

    def finish(self, reason: str | None) -> tuple[str, list[ToolCall] | None, str | None]:
        """(content still to send, the calls or None, the finish reason) once the reply ends.
        A reply cut before its calls closed (`length`, or a stop sequence) is sent as the text
        it got to."""
        rest = self.feed("")
        if self._mode == "none" or self._raw.startswith(RESPONSE_OPENING):
            return rest, None, reason
        if reason == "stop":
            try:
                return "", parse_calls(self._raw, self._model_id), "tool_calls"
            except (ValueError, KeyError, TypeError):  # not the grammar's JSON: sent as text
                pass
        return self._raw, None, reason


class NativeReplyReader:
    """Reads one choice's reply in a native format as it streams: the text before the first
    call goes out as content (held back only while it could be the start of the opening), and
    the calls once the reply ends."""

    def __init__(self, format_: NativeFormat, model_id: str) -> None:
        self._format = format_
        self._model_id = model_id
        self._raw = ""
        self._sent = 0  # characters of `_raw` sent as content

    def feed(self, text: str) -> str:
        """The content `text` completes."""
        self._raw += text
        start = self._raw.find(self._format.opening)
        if start < 0:  # all of it, but what could be the opening's beginning
            start = len(self._raw) - partial_suffix(self._raw, self._format.opening)
        content = self._raw[self._sent : max(start, self._sent)]
        self._sent += len(content)
        return content

    def finish(self, reason: str | None) -> tuple[str, list[ToolCall] | None, str | None]:
        """(content still to send, the calls or None, the finish reason) once the reply ends;
        calls cut short (`length`) are sent as the text they got to."""
        if reason == "stop" and self._format.opening in self._raw:
            # The grammar writes `opening\n{json}\nclosing`: a raw newline is in no JSON
            # string, so the closing's newline is where a call's JSON ends.
            opening, closing = (re.escape(m) for m in (self._format.opening, self._format.closing))
            bodies = re.findall(f"{opening}\\n(.*?)\\n{closing}", self._raw, flags=re.DOTALL)
            try:
                calls = calls_of([json.loads(body) for body in bodies], self._model_id)
            except (ValueError, KeyError, TypeError):  # not the grammar's: sent as text
                calls = []
            if calls:
                return "", calls, "tool_calls"
        rest = self._raw[self._sent :]
        self._sent = len(self._raw)
        return rest, None, reason


def _decode_string(raw: str, start: int) -> tuple[str, int]:
    """The text of the JSON string body in `raw` from `start`, as far as it is complete (up to
    its closing quote, or an escape not yet whole), and where decoding stopped."""
    parts: list[str] = []
    at = start
    while at < len(raw) and raw[at] != '"':
        end = at + 1 if raw[at] != "\\" else _escape_end(raw, at)
        if end is None:
            break
        parts.append(json.loads(f'"{raw[at:end]}"') if end - at > 1 else raw[at])
        at = end
    return valid_unicode("".join(parts)), at


_LOW_SURROGATE = re.compile(r"\\u[dD][c-fC-F][0-9a-fA-F]{2}")
_LOW_SURROGATE_START = re.compile(r"(\\(u([dD]([c-fC-F][0-9a-fA-F]?)?)?)?)?")


def _escape_end(raw: str, at: int) -> int | None:
    """Where the escape at `at` ends (a high surrogate's with its low one, when one follows);
    None while it is not whole yet."""
    end = at + (6 if raw[at + 1 : at + 2] == "u" else 2)
    if end > len(raw):
        return None
    if end - at == 6 and 0xD800 <= int(raw[at + 2 : end], 16) < 0xDC00:
        follow = raw[end : end + 6]
        if _LOW_SURROGATE.fullmatch(follow):
            return end + 6
        if len(follow) < 6 and _LOW_SURROGATE_START.fullmatch(follow):
            return None  # its low half may be on the way
    return end


def valid_unicode(text: str) -> str:
    """`text` with any lone surrogate (JSON's grammar lets `\\ud800` through alone) as U+FFFD:
    a lone surrogate cannot be encoded in UTF-8, so no response could carry it."""
    return text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")


def _calls_text(calls: list[dict[str, Any]], native: NativeFormat | None) -> str:
    """Past calls as the model wrote them: the generic JSON, or the template's own format."""
    if native is None:
        return json.dumps({"tool_calls": calls}, ensure_ascii=False)
    return "".join(
        f"{native.opening}\n{json.dumps(call, ensure_ascii=False)}\n{native.closing}"
        for call in calls
    )


def _call_json(call: ToolCall) -> dict[str, Any]:
    try:
        arguments: Any = json.loads(call.function.arguments)
    except json.JSONDecodeError:
        arguments = call.function.arguments
    return {"name": call.function.name, "arguments": arguments}


def _with_tool_list(
    messages: list[dict[str, str]], tools: list[ToolDef], mode: ToolMode
) -> list[dict[str, str]]:
    listed = [tool.function.model_dump(exclude_none=True, exclude={"strict"}) for tool in tools]
    calls = '{"tool_calls": [{"name": <function name>, "arguments": {<arguments>}}]}'
    if mode == "auto":  # llama.cpp's generic handler tells the model both forms, as here
        how = (
            "Respond in JSON format, either with tool_calls (a request to call functions): "
            f'{calls}, or with response (your reply to the user): {{"response": <your reply>}}.'
        )
    else:
        how = f"To call them, reply with JSON only: {calls}."
    note = f"You can call these functions. {how}\nFunctions: " + json.dumps(
        listed, ensure_ascii=False
    )
    if messages and messages[0]["role"] in ("system", "developer"):
        first = {**messages[0], "content": messages[0]["content"] + "\n\n" + note}
        return [first, *messages[1:]]
    return [{"role": "system", "content": note}, *messages]
