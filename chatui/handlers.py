"""The UI's callbacks: plain functions of component values, kept apart from the layout so that
tests can call them with a scripted client.

Callbacks catch only the client's `BackendError`s and show them in the chat as notices (the
history and any partial answer are kept); anything else is a bug and propagates. A reply is an
async generator: when Gradio cancels its event (Stop), the `aclosing` block closes the client's
stream, which closes the HTTP response so the backend frees the slot.

Callbacks that update several components return (or yield) `Updates`, keyed by the components'
names: `chatui.app.named` sends each to its component, and the outputs a callback leaves out
are not changed.
"""

from __future__ import annotations

import asyncio
import re
import shutil
import time
from collections.abc import AsyncGenerator
from contextlib import aclosing
from pathlib import Path
from typing import Any, TypedDict

import gradio as gr

from chatui.clients import (
    BackendError,
    BackendHTTPError,
    BackendStatus,
    BackendUnavailable,
    ChatClient,
    ChatOptions,
    Finished,
    TextDelta,
    ToolCalls,
    UnsupportedOption,
)
from chatui.conversation import (
    AnswerStats,
    ConversationImportError,
    ConversationRecord,
    History,
    SavedConversation,
    assistant_message,
    choices,
    dump_saved,
    export_json,
    export_markdown,
    find,
    fit_context,
    import_json,
    is_notice,
    load_saved,
    notice_message,
    reply_text,
    save,
    text_of,
    title_for,
    to_history,
    to_openai,
    to_record,
    tool_call_message,
    trim_note,
    user_message,
)
from chatui.settings import ChatUISettings
from chatui.tools import AUTO, ToolsError, tool_choices, tool_request

SKIP: dict[str, Any] = gr.skip()
# Under a reply that called tools (see `chatui.conversation.to_openai`).
NEXT_IS_RESULT = "↩️ Your next message is sent as the result of the tool call."


class Updates(TypedDict, total=False):
    """New values (or `gr.update`s) of the UI's components, by their names in `chatui.app`;
    a component left out keeps its value."""

    chatbot: Any
    stats: Any
    # The input controls (`control_updates`).
    msg: Any
    send: Any
    stop: Any
    regenerate: Any
    undo: Any
    # The conversation shown and the saved ones (`ChatHandlers._view`).
    conversation_id: Any
    saved: Any
    conversations: Any
    title: Any
    system_prompt: Any
    export_md: Any
    export_json: Any


CONTROLS = ("msg", "send", "stop", "regenerate", "undo")
VIEW = (
    "conversation_id",
    "saved",
    "conversations",
    "title",
    "system_prompt",
    "export_md",
    "export_json",
)


class HealthMonitor:
    """The backend's status shared by all sessions: checked at most once per `max_age_s`."""

    def __init__(self, client: ChatClient, max_age_s: float) -> None:
        self._client = client
        self._max_age_s = max_age_s
        self._status: BackendStatus | None = None
        self._checked_at = 0.0
        self._lock = asyncio.Lock()

    async def status(self) -> BackendStatus:
        """The cached status, refreshed when older than `max_age_s`."""
        async with self._lock:
            if self._status is None or time.monotonic() - self._checked_at >= self._max_age_s:
                self._status = await self._client.health()
                self._checked_at = time.monotonic()
            return self._status


class ExportFolder:
    """Export files per browser session: rewritten after each turn, removed when the tab closes."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def write(self, session: str, record: ConversationRecord) -> tuple[str, str]:
        """Write the Markdown and JSON exports of `record`; returns their paths."""
        folder = self.root / _slug(session)
        folder.mkdir(parents=True, exist_ok=True)
        stem = _slug(record.title)
        markdown, json_file = folder / f"{stem}.md", folder / f"{stem}.json"
        markdown.write_text(export_markdown(record), encoding="utf-8")
        json_file.write_text(export_json(record), encoding="utf-8")
        return str(markdown), str(json_file)

    def remove(self, session: str) -> None:
        """Delete a session's files."""
        shutil.rmtree(self.root / _slug(session), ignore_errors=True)


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-")[:60] or "chat"


def notice_for(error: BackendError) -> dict[str, Any]:
    """The chat notice that explains `error` and what to do next."""
    if isinstance(error, BackendUnavailable):
        title = "⚠️ Backend unreachable"
    elif isinstance(error, BackendHTTPError):
        title = f"⚠️ Backend error (HTTP {error.status_code})"
    elif isinstance(error, UnsupportedOption):
        title = "⚠️ Not possible with this backend API"
    else:
        title = "⚠️ Answer cut off"
    advice = "The conversation is kept: send a message or press Regenerate to try again."
    if isinstance(error, UnsupportedOption):
        advice = "The conversation is kept: change the setting, then press Regenerate."
    if isinstance(error, BackendHTTPError) and error.status_code == 401:
        # Retrying cannot help: the operator has to fix the key.
        title = "⚠️ The backend refused the UI's API key (HTTP 401)"
        advice = (
            "Set CHATUI_API_KEY to one of the backend's LLM_API_KEY keys (in the cluster: the "
            "Secret llm-api-key in both namespaces) and restart the UI."
        )
    return notice_message(title, f"{error}\n\n{advice}")


def tools_notice(error: ToolsError) -> dict[str, Any]:
    """The chat notice for a Tools setting that cannot be sent."""
    advice = (
        "The conversation is kept: fix Tools or the tool choice in Settings, then press Regenerate."
    )
    return notice_message("⚠️ Tools setting not usable", f"{error}\n\n{advice}")


def tool_choice_update(tools: str, choice: str) -> dict[str, Any]:
    """The tool choice control for the Tools box: `auto`, `required` and each function's name,
    the choice kept while it is still one of them; unchanged while the box cannot be read."""
    names = tool_choices(tools)
    if names is None:
        return SKIP
    return gr.update(choices=names, value=choice if choice in names else AUTO)


_STARTING = "🟡 Backend starting… (the model is loading)"
_WAITING = "⏳ Waiting for the first token…"


def status_markdown(status: BackendStatus) -> str:
    """The status line for a health check's result."""
    if status.state == "ready":
        window = f" · context {status.context_window} tokens" if status.context_window else ""
        return f"🟢 Backend ready · model **{status.model or 'unknown'}**{window}"
    if status.state == "loading":
        return f"🟡 Backend not ready: {status.detail}" if status.detail else _STARTING
    return f"🔴 Backend unreachable: {status.detail}"


def control_updates(busy: bool) -> Updates:
    """Updates of the `CONTROLS`: typing and sending wait for the reply, which Stop stops."""
    idle = not busy
    return {
        "msg": gr.update(interactive=idle),
        "send": gr.update(interactive=idle),
        "stop": gr.update(interactive=busy),
        "regenerate": gr.update(interactive=idle),
        "undo": gr.update(interactive=idle),
    }


def _last_user_index(history: History) -> int | None:
    return next((i for i in range(len(history) - 1, -1, -1) if history[i]["role"] == "user"), None)


class ChatHandlers:
    """The UI's callbacks, kept apart from the layout so tests can call them directly."""

    def __init__(self, settings: ChatUISettings, client: ChatClient, exports: ExportFolder):
        self.settings = settings
        self.client = client
        self.monitor = HealthMonitor(client, settings.health_poll_interval_s)
        self.exports = exports

    async def respond(
        self,
        history: History,
        system_prompt: str,
        temperature: float,
        top_p: float,
        max_tokens: float,
        json_output: bool,
        tools: str,
        tool_choice: str,
    ) -> AsyncGenerator[Updates, None]:
        """Stream the answer to the history's last user message: yields the chatbot's history
        and the stats line.
        A JSON reply streams as it comes and is shown as a code block once complete; a reply
        that calls tools shows its calls when they come (at its end)."""
        if not history or history[-1]["role"] != "user":
            yield {}  # nothing to answer (e.g. an empty message was submitted)
            return
        try:
            request = tool_request(tools, tool_choice, json_output=json_output)
        except ToolsError as exc:
            yield {"chatbot": [*history, tools_notice(exc)], "stats": ""}
            return
        options = ChatOptions(temperature, top_p, int(max_tokens), json_output, request)
        status = await self.monitor.status()
        window = status.context_window or self.settings.default_context_window
        fitted = fit_context(to_openai(history, system_prompt), window, options.max_tokens)
        note = trim_note(fitted.dropped)
        waiting = "⏳ Waiting for the tool call (it comes whole)…" if request else _WAITING
        yield {"chatbot": history, "stats": _lines(waiting, note)}
        answer, started, first_token_at = "", time.monotonic(), None
        calls: ToolCalls | None = None
        finished: Finished | None = None
        try:
            async with aclosing(self.client.stream_chat(fitted.messages, options)) as events:
                async for event in events:
                    if isinstance(event, TextDelta):
                        first_token_at = first_token_at or time.monotonic()
                        answer += event.text
                        yield {
                            "chatbot": [*history, assistant_message(answer)],
                            "stats": _lines("✍️ Writing…", note),
                        }
                    elif isinstance(event, ToolCalls):
                        calls = event  # whole at the end: no time to a first token, no rate
                    else:
                        finished = event
        except BackendError as exc:
            partial = [assistant_message(answer)] if answer else []
            yield {"chatbot": [*history, *partial, notice_for(exc)], "stats": note}
            return
        assert finished is not None  # clients end every complete reply with `Finished`
        stats = AnswerStats(
            ttft_s=first_token_at - started if first_token_at else None,
            total_s=time.monotonic() - started,
            completion_tokens=finished.usage.completion_tokens if finished.usage else None,
            finish_reason=finished.finish_reason,
            prompt_tokens=finished.usage.prompt_tokens if finished.usage else None,
            cached_tokens=finished.usage.cached_tokens if finished.usage else 0,
        )
        if calls:
            called = tool_call_message(calls.calls, answer)
            yield {
                "chatbot": [*history, called],
                "stats": _lines(stats.to_markdown(), NEXT_IS_RESULT, note),
            }
            return
        reply = [assistant_message(answer, json_output=json_output)] if answer else []
        yield {"chatbot": [*history, *reply], "stats": _lines(stats.to_markdown(), note)}

    def regenerate(self, history: History) -> Updates:
        """Drop the last answer (and any notice after it) so the last question is asked again."""
        last = _last_user_index(history)
        if last is None:
            return {}
        return {"chatbot": history[: last + 1], **control_updates(busy=True)}

    def edit(self, history: History, edit: gr.EditData) -> Updates:
        """Replace an edited user message and forget everything after it."""
        index = edit.index[0] if isinstance(edit.index, (list, tuple)) else edit.index
        edited = [*history[:index], user_message(text_of(edit.value))]
        return {"chatbot": edited, **control_updates(busy=True)}

    def example(self, example: gr.SelectData) -> Updates:
        """Start a chat with the example prompt that was clicked."""
        return {"chatbot": [user_message(text_of(example.value))], **control_updates(busy=True)}

    def undo(self, history: History) -> Updates:
        """Remove the last question and its answer, and put the question back in the textbox."""
        last = _last_user_index(history)
        if last is None:
            return {}
        return {"chatbot": history[:last], "msg": text_of(history[last]["content"])}

    def finish_turn(
        self,
        history: History,
        conversation_id: str | None,
        saved_raw: Any,
        system_prompt: str,
        request: gr.Request | None = None,
    ) -> Updates:
        """Save the conversation in the browser, refresh the exports, unlock the input."""
        view = self.save_turn(history, conversation_id, saved_raw, system_prompt, request)
        return {**view, **control_updates(busy=False)}

    def save_turn(
        self,
        history: History,
        conversation_id: str | None,
        saved_raw: Any,
        system_prompt: str,
        request: gr.Request | None = None,
    ) -> Updates:
        """Save the conversation in the browser and refresh the exports (after Undo: the input
        is not locked then)."""
        saved = load_saved(saved_raw)
        current = find(saved, conversation_id)
        if history or current:  # an undo down to nothing still updates the saved copy
            title = current.title if current else title_for(history)
            saved, conversation_id = save(
                saved, to_record(history, title, system_prompt), conversation_id
            )
        return self._view(saved, conversation_id, _session(request))

    def new_chat(self, saved_raw: Any, request: gr.Request | None = None) -> Updates:
        """An empty chat; the saved ones stay in the list."""
        view = self._view(load_saved(saved_raw), None, _session(request))
        return {"chatbot": [], "stats": "", **view}

    def open_conversation(
        self, conversation_id: str | None, saved_raw: Any, request: gr.Request | None = None
    ) -> Updates:
        """Show a saved conversation with its system prompt."""
        saved = load_saved(saved_raw)
        current = find(saved, conversation_id)
        if current is None:
            return self.new_chat(saved_raw, request)
        view = self._view(saved, current.id, _session(request))
        return {"chatbot": to_history(current), "stats": "", **view}

    def rename(
        self,
        conversation_id: str | None,
        title: str,
        saved_raw: Any,
        request: gr.Request | None = None,
    ) -> Updates:
        """Give the current conversation a new title."""
        saved = load_saved(saved_raw)
        current = find(saved, conversation_id)
        if current is None or not title.strip():
            unsaved = "Send a message first: only saved conversations can be renamed."
            gr.Warning("Type a title first." if current else unsaved)
            return self._view(saved, conversation_id, _session(request))
        renamed = current.model_copy(update={"title": " ".join(title.split())[:200]})
        saved = [renamed if c.id == current.id else c for c in saved]
        return self._view(saved, current.id, _session(request))

    def delete(
        self, conversation_id: str | None, saved_raw: Any, request: gr.Request | None = None
    ) -> Updates:
        """Delete the current conversation and start a new one."""
        remaining = [c for c in load_saved(saved_raw) if c.id != conversation_id]
        return self.new_chat(dump_saved(remaining), request)

    def import_file(
        self, path: str | None, saved_raw: Any, request: gr.Request | None = None
    ) -> Updates:
        """Add a conversation from a JSON export and show it; a bad file only warns."""
        if not path:
            return {}
        try:
            record = import_json(Path(path).read_bytes())
        except ConversationImportError as exc:
            gr.Warning(str(exc))
            return {}
        saved, conversation_id = save(load_saved(saved_raw), record, None)
        return self.open_conversation(conversation_id, dump_saved(saved), request)

    def conversation_list(self, saved_raw: Any, conversation_id: str | None) -> dict[str, Any]:
        """The conversation list as stored in this browser."""
        return gr.update(choices=choices(load_saved(saved_raw)), value=conversation_id)

    def stopped(self) -> str:
        """The stats line after Stop: the reply's event is cancelled, its text so far stays."""
        return "⏹ Stopped: the answer above is incomplete."

    def end_session(self, request: gr.Request) -> None:
        """Remove the closed tab's export files."""
        self.exports.remove(_session(request))

    async def status(self) -> str:
        """The status line."""
        return status_markdown(await self.monitor.status())

    async def chat(
        self,
        message: str,
        history: list[dict[str, Any]] | None = None,
        system_prompt: str | None = None,
        temperature: float | None = None,
        top_p: float | None = None,
        max_tokens: int | None = None,
        json_output: bool | None = None,
    ) -> dict[str, Any]:
        """One chat turn: `message` after `history` (OpenAI-style user/assistant messages).
        Returns {"reply": str, "history": [...]}; pass that history to the next call. With
        `json_output` the reply is one JSON object, returned as the text the model wrote."""
        if not message.strip():
            raise gr.Error("The message is empty.")
        turns = [*_api_history(history or []), user_message(message)]
        result: Any = turns
        async for update in self.respond(
            turns,
            self.settings.system_prompt if system_prompt is None else system_prompt,
            self.settings.temperature if temperature is None else temperature,
            self.settings.top_p if top_p is None else top_p,
            self.settings.max_tokens if max_tokens is None else max_tokens,
            self.settings.json_output if json_output is None else json_output,
            # No tools: the API's {role, content} history has no place for a turn's calls.
            "",
            AUTO,
        ):
            result = update.get("chatbot", result)
        last = result[-1]
        if is_notice(last):
            title = last["metadata"]["title"]
            raise gr.Error(text_of(last["content"]), title=title, print_exception=False)
        if last["role"] != "assistant":
            result = [*result, assistant_message("")]  # the model chose to say nothing
        return {
            "reply": reply_text(result[-1]),
            "history": [{"role": m["role"], "content": reply_text(m)} for m in result],
        }

    def _view(
        self, saved: list[SavedConversation], conversation_id: str | None, session: str
    ) -> Updates:
        """Updates of the `VIEW`: the conversation `conversation_id` of `saved` is shown."""
        current = find(saved, conversation_id)
        view: Updates = {
            "conversation_id": conversation_id,
            "saved": dump_saved(saved),
            "conversations": gr.update(choices=choices(saved), value=conversation_id),
        }
        if current is None:  # a new chat: keeps the system prompt the user has set
            no_file = gr.update(value=None, interactive=False)
            return {**view, "title": "", "export_md": no_file, "export_json": no_file}
        markdown, json_file = self.exports.write(session, current)
        return {
            **view,
            "title": current.title,
            "system_prompt": current.system_prompt,
            "export_md": gr.update(value=markdown, interactive=True),
            "export_json": gr.update(value=json_file, interactive=True),
        }


def _lines(*lines: str) -> str:
    return "  \n".join(line for line in lines if line)


def _session(request: gr.Request | None) -> str:
    return (request.session_hash if request else None) or "default"


def _api_history(history: list[dict[str, Any]]) -> History:
    messages = []
    for message in history:
        role = message.get("role") if isinstance(message, dict) else None
        if role not in ("user", "assistant"):
            raise gr.Error("`history` must be a list of {role: user|assistant, content} messages.")
        text = text_of(message.get("content"))
        messages.append(user_message(text) if role == "user" else assistant_message(text))
    return messages
