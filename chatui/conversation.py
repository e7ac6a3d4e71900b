"""Conversations as data: Gradio chat history ↔ OpenAI messages, context trimming, export and
import, saved-conversation lists, and per-answer stats. Pure functions, no I/O.

A Gradio history is a list of message dicts (`role`, `content`, optional `metadata`); `content`
is a string, one part or a list of parts like `{"type": "text", "text": …}`. Messages whose
metadata has a `title` are notices (errors shown in the chat): the user sees them, the model never.

With JSON output on, a reply that parses is shown as a pretty-printed ```json block, but the model
and the exports get its text as it came. Gradio keeps only its own metadata keys through the
browser and shows them only on titled messages, so that text rides in the metadata's `log`;
`reply_text` reads it back.

A reply that called tools is shown as each call's function name and pretty-printed arguments; the
assistant message as it goes back to the backend (`tool_calls` with their ids, names and
arguments as they came) rides in the metadata's `log` too, marked by the metadata `id`
`tool_calls` (Gradio nests only titled messages by id). The user's next message is the calls'
result (see `to_openai`).
"""

from __future__ import annotations

import json
import math
import re
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, Field, TypeAdapter, ValidationError

from chatui.tools import ToolCall

History = list[dict[str, Any]]
OpenAIMessage = dict[str, Any]

# Chat templates wrap every message in a few tokens of markup (role tags, separators).
MESSAGE_OVERHEAD_TOKENS = 8
CHARS_PER_TOKEN = 3
TITLE_CHARS = 48
TOOL_CALLS = "tool_calls"  # the metadata id of a reply that called tools
_CALLS = TypeAdapter(list[ToolCall])


class ConversationImportError(ValueError):
    """Raised by `import_json` when a file is not a conversation exported by this UI."""


def text_of(content: Any) -> str:
    """The text of a message's content: a string, one part, or a list of parts (files skipped)."""
    if isinstance(content, str):
        return content
    if isinstance(content, dict):
        return content.get("text", "") if content.get("type", "text") == "text" else ""
    if isinstance(content, Sequence):
        return "".join(text_of(part) for part in content)
    return ""


def _message(role: str, text: str, title: str | None = None) -> dict[str, Any]:
    # Content as a text part: Gradio passes bare strings through `inspect.cleandoc`, which would
    # strip the indentation of code in a reply.
    message: dict[str, Any] = {"role": role, "content": [{"type": "text", "text": text}]}
    if title:
        message["metadata"] = {"title": title}
    return message


def user_message(text: str) -> dict[str, Any]:
    """A user message for the chat history."""
    return _message("user", text)


def assistant_message(text: str, *, json_output: bool = False) -> dict[str, Any]:
    """An assistant message for the chat history; with `json_output`, a reply that parses as JSON
    is shown as a pretty-printed ```json block and keeps its own text (see `reply_text`)."""
    pretty = _pretty_json(text) if json_output else None
    if pretty is None:
        return _message("assistant", text)  # cut short, or not JSON: shown as it came
    message = _message("assistant", fenced(pretty, "json"))
    message["metadata"] = {"log": text}
    return message


def tool_call_message(calls: Sequence[ToolCall], text: str = "") -> dict[str, Any]:
    """An assistant message that called tools: shown as each call's function and arguments,
    kept as it goes back to the backend (see `to_openai`)."""
    sent = {
        "role": "assistant",
        "content": text or None,
        "tool_calls": _CALLS.dump_python(list(calls)),
    }
    message = _message("assistant", calls_markdown(calls, text))
    message["metadata"] = {"id": TOOL_CALLS, "log": json.dumps(sent, ensure_ascii=False)}
    return message


def calls_markdown(calls: Sequence[ToolCall], text: str = "") -> str:
    """The reply's text, then each call: its function's name and its arguments as a code block
    (pretty-printed JSON when they parse)."""
    parts = [text] if text else []
    for call in calls:
        pretty = _pretty_json(call.function.arguments)
        block = fenced(call.function.arguments) if pretty is None else fenced(pretty, "json")
        parts.append(f"🛠️ Tool call `{call.function.name}`\n\n{block}")
    return "\n\n".join(parts)


def _pretty_json(text: str) -> str | None:
    try:
        value = json.loads(text)
    except (ValueError, RecursionError):
        return None
    return json.dumps(value, indent=2, ensure_ascii=False)


def fenced(text: str, language: str = "") -> str:
    """`text` as a Markdown code block, fenced by more backticks than it has in a row."""
    longest = max((len(run) for run in re.findall(r"`+", text)), default=0)
    fence = "`" * max(3, longest + 1)
    return f"{fence}{language}\n{text}\n{fence}"


def is_json_reply(message: dict[str, Any]) -> bool:
    """Whether `message` is a JSON reply shown as a code block (see `assistant_message`)."""
    metadata = message.get("metadata") or {}
    return (
        message.get("role") == "assistant"
        and not metadata.get("title")
        and metadata.get("id") != TOOL_CALLS
        and isinstance(metadata.get("log"), str)
    )


def is_tool_call(message: dict[str, Any]) -> bool:
    """Whether `message` is a reply that called tools (see `tool_call_message`)."""
    metadata = message.get("metadata") or {}
    return (
        message.get("role") == "assistant"
        and metadata.get("id") == TOOL_CALLS
        and isinstance(metadata.get("log"), str)
    )


def _sent(message: dict[str, Any]) -> OpenAIMessage:
    """A tool-call message as it goes back to the backend."""
    sent: OpenAIMessage = json.loads(message["metadata"]["log"])
    return sent


def tool_calls_of(message: dict[str, Any]) -> list[ToolCall]:
    """The calls a message made, as they came; [] for any other message."""
    return _CALLS.validate_python(_sent(message)["tool_calls"]) if is_tool_call(message) else []


def reply_text(message: dict[str, Any]) -> str:
    """A message's text as written: for a JSON reply, the reply as it came, not its display;
    for a tool call, the text beside its calls (usually none)."""
    if is_tool_call(message):
        return str(_sent(message)["content"] or "")
    if is_json_reply(message):
        return str(message["metadata"]["log"])
    return text_of(message.get("content"))


def notice_message(title: str, text: str) -> dict[str, Any]:
    """A notice: shown in the chat under `title`, never sent to the model."""
    return _message("assistant", text, title)


def is_notice(message: dict[str, Any]) -> bool:
    """Whether `message` is a notice rather than part of the conversation."""
    return bool((message.get("metadata") or {}).get("title"))


def to_openai(history: History, system_prompt: str) -> list[OpenAIMessage]:
    """The messages to send: system prompt first, then user/assistant turns that alternate.

    Notices and empty messages are left out; consecutive messages of one role (a question that
    got no answer, then another) are joined, because chat templates such as Mistral's require
    strict alternation; assistant messages before the first user message are dropped. A reply
    that called tools goes back with its `tool_calls`, and the user's message after it is the
    result of each of its calls: one `tool` message per call, with that call's id.
    """
    messages: list[OpenAIMessage] = []
    if system_prompt.strip():
        messages.append({"role": "system", "content": system_prompt.strip()})
    for message in history:
        sent = _to_send(message)
        if sent is None:
            continue
        last = messages[-1] if messages else {"role": "system"}
        if sent["role"] == "user" and (last["role"] == "tool" or last.get("tool_calls")):
            _answer_calls(messages, sent["content"])
        elif sent["role"] == last["role"]:
            _join(last, sent)
        elif sent["role"] == "user" or last["role"] != "system":
            messages.append(sent)
    return messages


def _to_send(message: dict[str, Any]) -> OpenAIMessage | None:
    """A history message as the backend gets it; None for notices and empty messages."""
    role = message.get("role")
    if role not in ("user", "assistant") or is_notice(message):
        return None
    if is_tool_call(message):
        return _sent(message)
    text = reply_text(message).strip()
    return {"role": role, "content": text} if text else None


def _join(into: OpenAIMessage, message: OpenAIMessage) -> None:
    texts = (into.get("content"), message.get("content"))
    into["content"] = "\n\n".join(text for text in texts if text) or None
    if message.get("tool_calls"):
        into["tool_calls"] = [*(into.get("tool_calls") or []), *message["tool_calls"]]


def _answer_calls(messages: list[OpenAIMessage], text: str) -> None:
    """The user's text as the result of every call of the last reply; a second message before
    the next reply (the first got an error) joins the results."""
    last = messages[-1]
    if last["role"] == "tool":
        for message in reversed(messages):
            if message["role"] != "tool":
                break
            _join(message, {"content": text})
        return
    for call in last["tool_calls"]:
        messages.append({"role": "tool", "tool_call_id": call["id"], "content": text})


def estimate_tokens(message: OpenAIMessage) -> int:
    """A deliberately high token estimate for one message (about 3 characters per token)."""
    size = len(message.get("content") or "") + len(json.dumps(message.get("tool_calls") or ""))
    return math.ceil(size / CHARS_PER_TOKEN) + MESSAGE_OVERHEAD_TOKENS


@dataclass(frozen=True)
class Fitted:
    """Messages that fit the context window, and how many older ones were left out."""

    messages: list[OpenAIMessage]
    dropped: int


def fit_context(messages: list[OpenAIMessage], context_window: int, max_tokens: int) -> Fitted:
    """Drop the oldest turns until the prompt plus `max_tokens` fits `context_window`.

    The system prompt and the latest turn (the new question) are always kept: if even they do not
    fit, they are sent anyway and the backend's own error explains the problem.
    """
    head = messages[:1] if messages and messages[0]["role"] == "system" else []
    rest = messages[len(head) :]
    starts = [i for i, m in enumerate(rest) if m["role"] == "user"] or [0]
    budget = context_window - max_tokens - sum(estimate_tokens(m) for m in head)
    total = sum(estimate_tokens(m) for m in rest)
    cut = 0
    for start in starts[1:]:  # turn boundaries; the last turn is never dropped
        if total <= budget:
            break
        total -= sum(estimate_tokens(m) for m in rest[cut:start])
        cut = start
    return Fitted(head + rest[cut:], cut)


class RecordMessage(BaseModel):
    """One message of an exported conversation; `notice` holds a notice's title, `json_reply`
    marks a JSON reply (its text as it came), `tool_calls` the calls of a reply that called
    tools (these two written only when set, so plain chats export as they always did)."""

    role: Literal["user", "assistant"]
    content: str
    notice: str | None = None
    json_reply: bool = Field(False, exclude_if=lambda value: not value)
    tool_calls: list[ToolCall] | None = Field(None, exclude_if=lambda value: value is None)


class ConversationRecord(BaseModel):
    """A conversation as exported to JSON and kept in the browser."""

    format: Literal["chatui-conversation"] = "chatui-conversation"
    version: Literal[1] = 1
    title: str = Field(min_length=1, max_length=200)
    system_prompt: str = ""
    messages: list[RecordMessage]


class SavedConversation(ConversationRecord):
    """A conversation saved in the browser, under a stable id."""

    id: str = Field(min_length=1)


def title_for(history: History) -> str:
    """A title from the first user message, shortened to one line."""
    first = next((text_of(m["content"]) for m in history if m.get("role") == "user"), "")
    words = " ".join(first.split()) or "New chat"
    return words if len(words) <= TITLE_CHARS else words[: TITLE_CHARS - 1].rstrip() + "…"


def to_record(history: History, title: str, system_prompt: str) -> ConversationRecord:
    """The exportable form of a chat history."""
    messages = [
        RecordMessage(
            role=m["role"],
            content=reply_text(m),
            notice=(m.get("metadata") or {}).get("title") or None,
            json_reply=is_json_reply(m),
            tool_calls=tool_calls_of(m) or None,
        )
        for m in history
        if m.get("role") in ("user", "assistant")
    ]
    return ConversationRecord(title=title, system_prompt=system_prompt, messages=messages)


def to_history(record: ConversationRecord) -> History:
    """The chat history of a record."""
    return [_from_record(m) for m in record.messages]


def _from_record(message: RecordMessage) -> dict[str, Any]:
    if message.role != "assistant" or message.notice:
        return _message(message.role, message.content, message.notice)
    if message.tool_calls:
        return tool_call_message(message.tool_calls, message.content)
    return assistant_message(message.content, json_output=message.json_reply)


def export_json(record: ConversationRecord) -> str:
    """The record as pretty-printed JSON (what `import_json` reads back); no browser-side id."""
    return record.model_dump_json(indent=2, include=set(ConversationRecord.model_fields))


def import_json(data: str | bytes) -> ConversationRecord:
    """Read an export back; `ConversationImportError` says what is wrong with a bad file."""
    try:
        return ConversationRecord.model_validate_json(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(part) for part in first["loc"]) or "the file"
        raise ConversationImportError(
            f"Not a conversation exported by this chat ({where}: {first['msg']})."
        ) from exc


def export_markdown(record: ConversationRecord) -> str:
    """The record as a Markdown document."""
    parts = [f"# {record.title}"]
    if record.system_prompt:
        parts.append(f"*System prompt:* {record.system_prompt}")
    for message in record.messages:
        if message.notice:
            quoted = "\n> ".join(message.content.splitlines())
            parts.append(f"> **{message.notice}**\n>\n> {quoted}")
        else:
            speaker = "You" if message.role == "user" else "Assistant"
            text = message.content
            if message.tool_calls:
                text = calls_markdown(message.tool_calls, message.content)
            elif message.json_reply:
                text = fenced(message.content, "json")
            parts.append(f"### {speaker}\n\n{text}")
    return "\n\n".join(parts) + "\n"


def load_saved(raw: Any) -> list[SavedConversation]:
    """The saved conversations from browser storage; entries that do not validate are skipped."""
    saved: list[SavedConversation] = []
    for entry in raw if isinstance(raw, list) else []:
        try:
            saved.append(SavedConversation.model_validate(entry))
        except ValidationError:
            continue  # written by an older version, or tampered with: not worth an error page
    return saved


def dump_saved(saved: list[SavedConversation]) -> list[dict[str, Any]]:
    """The saved conversations as JSON-ready values for browser storage."""
    return [conversation.model_dump() for conversation in saved]


def save(
    saved: list[SavedConversation], record: ConversationRecord, conversation_id: str | None
) -> tuple[list[SavedConversation], str]:
    """Insert or replace a conversation, newest first; returns the list and its id."""
    conversation_id = conversation_id or uuid.uuid4().hex[:12]
    entry = SavedConversation(id=conversation_id, **record.model_dump())
    return [entry, *(c for c in saved if c.id != conversation_id)], conversation_id


def find(saved: list[SavedConversation], conversation_id: str | None) -> SavedConversation | None:
    """The saved conversation with this id, if any."""
    return next((c for c in saved if c.id == conversation_id), None)


def choices(saved: list[SavedConversation]) -> list[tuple[str, str]]:
    """`(title, id)` pairs for the conversation list."""
    return [(c.title, c.id) for c in saved]


@dataclass(frozen=True)
class AnswerStats:
    """Timing and size of one answer, measured by the UI and counted by the backend."""

    ttft_s: float | None
    total_s: float
    completion_tokens: int | None
    finish_reason: str | None = None
    prompt_tokens: int | None = None
    cached_tokens: int = 0  # of the prompt's tokens, reused from the backend's KV cache

    def tokens_per_s(self) -> float | None:
        """Decoding speed: tokens after the first one over the time after the first one."""
        if self.ttft_s is None or not self.completion_tokens or self.completion_tokens < 2:
            return None
        decoding_s = self.total_s - self.ttft_s
        return (self.completion_tokens - 1) / decoding_s if decoding_s > 0 else None

    def to_markdown(self) -> str:
        """One line such as `⏱ 0.42 s to first token · 23.1 tok/s · 87 tokens · prompt 950
        tokens, 900 reused · 4.10 s in all`."""
        parts = []
        if self.ttft_s is not None:
            parts.append(f"⏱ {self.ttft_s:.2f} s to first token")
        if (rate := self.tokens_per_s()) is not None:
            parts.append(f"{rate:.1f} tok/s")
        if self.completion_tokens is not None:
            parts.append(f"{self.completion_tokens} tokens")
        if self.prompt_tokens:
            parts.append(f"prompt {self.prompt_tokens} tokens, {self.cached_tokens} reused")
        parts.append(f"{self.total_s:.2f} s in all")
        if self.finish_reason == "length":
            parts.append("stopped at the max tokens limit")
        return " · ".join(parts)


def trim_note(dropped: int) -> str:
    """The line telling the user that older messages were not sent, or "" when none were."""
    if not dropped:
        return ""
    noun = "message was" if dropped == 1 else "messages were"
    return f"✂️ {dropped} older {noun} left out to fit the model's context window."
