"""The Gradio 6 chat UI: layout and event wiring (`build_app`) and launch options.

A reply runs as a queued event; Stop (and New chat, switching, deleting, importing, editing)
cancels it, which closes the HTTP stream to the backend (see `chatui.handlers`).
"""

from __future__ import annotations

import functools
import inspect
import json
import tempfile
from collections.abc import AsyncGenerator, Callable, Mapping, Sequence
from contextlib import aclosing
from pathlib import Path
from typing import Any

import gradio as gr
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from chatui.clients import ChatClient, create_client
from chatui.handlers import (
    CONTROLS,
    SKIP,
    VIEW,
    ChatHandlers,
    ExportFolder,
    Updates,
    control_updates,
    tool_choice_update,
)
from chatui.settings import ChatUISettings
from chatui.tools import tool_choices

EXAMPLES = [
    "Explain continuous batching for LLM serving in three sentences.",
    "Write a Python function that checks whether a string is a palindrome.",
    "What is AWS Inferentia2, and how does it differ from a GPU?",
]
CSS = """
#status, #stats { font-size: var(--text-sm); color: var(--body-text-color-subdued); }
#stats { min-height: 1.5em; }
"""
THEME = gr.themes.Soft()
TOOLS_EXAMPLE = json.dumps(
    [
        {
            "type": "function",
            "function": {
                "name": "get_weather",
                "description": "The weather in a city",
                "parameters": {
                    "type": "object",
                    "properties": {"city": {"type": "string"}},
                    "required": ["city"],
                },
            },
        }
    ]
)
# The browser keeps saved chats under a fixed key and secret so that they survive restarts and
# reach every replica; they are the user's own data in the user's own browser.
STORAGE_KEY = "chatui-conversations"
STORAGE_SECRET = "chatui-conversations-v1"


def build_app(settings: ChatUISettings, client: ChatClient | None = None) -> gr.Blocks:
    """The chat UI as Gradio Blocks, queued with the configured concurrency."""
    client = client or create_client(settings)
    exports = ExportFolder(Path(tempfile.gettempdir()) / "chatui-exports")
    h = ChatHandlers(settings, client, exports)
    # Gradio keeps copies of the export files in its cache; sweep them hourly.
    with gr.Blocks(
        title="Mistral chat", analytics_enabled=False, delete_cache=(3600, 3600)
    ) as demo:
        saved = gr.BrowserState([], storage_key=STORAGE_KEY, secret=STORAGE_SECRET)
        conversation_id = gr.State(None)
        with gr.Sidebar(label="Conversations", elem_id="sidebar"):
            new_chat = gr.Button("New chat", elem_id="new-chat", variant="primary")
            conversations = gr.Radio(label="Saved chats", choices=[], elem_id="conversations")
            title = gr.Textbox(label="Title", elem_id="title", placeholder="Send a message first")
            with gr.Row():
                rename = gr.Button("Rename", elem_id="rename", size="sm")
                delete = gr.Button("Delete", elem_id="delete", size="sm", variant="stop")
            with gr.Row():
                export_md = gr.DownloadButton(
                    "Export Markdown", elem_id="export-md", size="sm", interactive=False
                )
                export_json = gr.DownloadButton(
                    "Export JSON", elem_id="export-json", size="sm", interactive=False
                )
            import_button = gr.UploadButton(
                "Import JSON", file_types=[".json"], elem_id="import", size="sm"
            )
        status = gr.Markdown("Checking the backend…", elem_id="status")
        chatbot = gr.Chatbot(
            elem_id="chatbot",
            label="Chat",
            height="62vh",
            editable="user",
            buttons=["copy", "copy_all"],
            examples=[{"text": text} for text in EXAMPLES],
            placeholder="Ask anything. The whole conversation is sent with every message.",
        )
        stats = gr.Markdown("", elem_id="stats")
        with gr.Row(equal_height=True):
            msg = gr.Textbox(
                elem_id="msg",
                show_label=False,
                placeholder="Type a message and press Enter",
                autofocus=True,
                max_lines=8,
                scale=8,
            )
            send = gr.Button("Send", elem_id="send", variant="primary", scale=1, min_width=80)
            stop = gr.Button(
                "Stop", elem_id="stop", variant="stop", interactive=False, scale=1, min_width=80
            )
        with gr.Row():
            regenerate = gr.Button("Regenerate", elem_id="regenerate", size="sm")
            undo = gr.Button("Undo", elem_id="undo", size="sm")
        with gr.Accordion("Settings", open=False, elem_id="settings"):
            system_prompt = gr.Textbox(
                settings.system_prompt, label="System prompt", lines=3, elem_id="system-prompt"
            )
            temperature = gr.Slider(
                0, 2, settings.temperature, step=0.05, label="Temperature", elem_id="temperature"
            )
            top_p = gr.Slider(0.05, 1, settings.top_p, step=0.05, label="Top p", elem_id="top-p")
            max_tokens = gr.Slider(
                1,
                max(2048, settings.max_tokens),
                settings.max_tokens,
                step=1,
                label="Max tokens per answer",
                elem_id="max-tokens",
            )
            json_output = gr.Checkbox(
                settings.json_output,
                label="JSON output",
                info="Each answer is one JSON object, shown as a code block when complete.",
                elem_id="json-output",
            )
            tools = gr.Textbox(
                settings.tools,
                label="Tools",
                info="An OpenAI `tools` JSON list of functions the model may call; your message "
                "after a call is its result. Empty = a plain chat.",
                placeholder=TOOLS_EXAMPLE,
                lines=3,
                max_lines=16,
                elem_id="tools",
            )
            tool_choice = gr.Dropdown(
                tool_choices(settings.tools) or [],
                value=settings.tool_choice,
                label="Tool choice",
                info="`auto`: the model answers or calls; `required`: it calls any of the "
                "functions; or the one function it calls.",
                elem_id="tool-choice",
            )
        timer = gr.Timer(settings.health_poll_interval_s)

        # The components that handlers update, by the names of `Updates`.
        components: dict[str, gr.components.Component] = {
            "chatbot": chatbot,
            "stats": stats,
            "msg": msg,
            "send": send,
            "stop": stop,
            "regenerate": regenerate,
            "undo": undo,
            "conversation_id": conversation_id,
            "saved": saved,
            "conversations": conversations,
            "title": title,
            "system_prompt": system_prompt,
            "export_md": export_md,
            "export_json": export_json,
        }

        def to(handler: Callable[..., Any], *names: str) -> dict[str, Any]:
            return named(handler, {name: components[name] for name in names})

        local: dict[str, Any] = {"queue": False, "api_visibility": "private"}
        replies = []

        def answer(start: Any) -> None:
            reply = start.then(
                inputs=[
                    chatbot,
                    *(system_prompt, temperature, top_p, max_tokens, json_output),
                    *(tools, tool_choice),
                ],
                **to(h.respond, "chatbot", "stats"),
                concurrency_limit=settings.concurrency_limit,
                concurrency_id="chat",
                show_progress="hidden",
                api_visibility="private",
            )
            reply.then(
                inputs=[chatbot, conversation_id, saved, system_prompt],
                **to(h.finish_turn, *VIEW, *CONTROLS),
                **local,
            )
            replies.append(reply)

        starts = ("chatbot", *CONTROLS)
        answer(
            gr.on(
                [msg.submit, send.click],
                None,
                [msg, chatbot],
                [components[name] for name in starts],
                js=add_message_js(starts),
                **local,
            )
        )
        answer(regenerate.click(inputs=[chatbot], **to(h.regenerate, *starts), **local))
        answer(chatbot.edit(inputs=[chatbot], **to(h.edit, *starts), **local))
        answer(chatbot.example_select(inputs=None, **to(h.example, *starts), **local))
        undo.click(inputs=[chatbot], **to(h.undo, "chatbot", "msg"), **local).then(
            inputs=[chatbot, conversation_id, saved, system_prompt],
            **to(h.save_turn, *VIEW),
            **local,
        )
        # Stop, and anything that replaces the chat, cancels the reply being written into it.
        stop.click(h.stopped, None, [stats], cancels=replies, **local)
        chatbot.edit(None, None, None, cancels=replies, **local)
        shown = ("chatbot", "stats", *VIEW)
        # The chatbot's own trash button starts a new chat too (the saved one stays).
        gr.on(
            [new_chat.click, chatbot.clear],
            inputs=[saved],
            **to(h.new_chat, *shown),
            cancels=replies,
            **local,
        )
        conversations.input(
            inputs=[conversations, saved],
            **to(h.open_conversation, *shown),
            cancels=replies,
            **local,
        )
        delete.click(
            inputs=[conversation_id, saved], **to(h.delete, *shown), cancels=replies, **local
        )
        # Queued, unlike the rest: gr.Warning reaches the browser only from queued events.
        import_button.upload(
            inputs=[import_button, saved],
            **to(h.import_file, *shown),
            cancels=replies,
            **{**local, "queue": True},
        )
        gr.on(
            [rename.click, title.submit],
            inputs=[conversation_id, title, saved],
            **to(h.rename, *VIEW),
            api_visibility="private",
        )
        tools.change(tool_choice_update, [tools, tool_choice], [tool_choice], **local)
        demo.load(h.conversation_list, [saved, conversation_id], [conversations], **local)
        gr.on([demo.load, timer.tick], h.status, None, [status], show_progress="hidden", **local)
        demo.unload(h.end_session)
        gr.api(
            h.chat,
            api_name="chat",
            concurrency_limit=settings.concurrency_limit,
            concurrency_id="chat",
        )
    demo.queue(default_concurrency_limit=settings.concurrency_limit)
    return demo


def named(
    handler: Callable[..., Any], outputs: Mapping[str, gr.components.Component]
) -> dict[str, Any]:
    """The `fn` and `outputs` of an event whose handler returns (or yields) `Updates`: each
    update goes to the output of its name, as Gradio's `{component: value}` dict, and the
    outputs it leaves out are skipped. An update of a component that is not among `outputs`
    is an error, not an update of another one. The handler keeps its name, signature and type
    hints (Gradio reads `gr.Request` and event data parameters from them)."""

    def by_component(updates: Updates) -> dict[gr.components.Component, Any]:
        unknown = set(updates) - set(outputs)
        if unknown:
            raise ValueError(
                f"{handler.__name__} updates {sorted(unknown)}, not outputs of its event"
            )
        values: Mapping[str, Any] = updates
        return {component: values.get(name, SKIP) for name, component in outputs.items()}

    fn: Callable[..., Any]
    if inspect.isasyncgenfunction(handler):

        @functools.wraps(handler)
        async def stream(*args: Any) -> AsyncGenerator[dict[gr.components.Component, Any], None]:
            # Closed when Gradio cancels the event: closes the handler's stream at once.
            async with aclosing(handler(*args)) as updates:
                async for update in updates:
                    yield by_component(update)

        fn = stream
    else:

        @functools.wraps(handler)
        def call(*args: Any) -> dict[gr.components.Component, Any]:
            return by_component(handler(*args))

        fn = call
    return {"fn": fn, "outputs": list(outputs.values())}


def add_message_js(outputs: Sequence[str]) -> str:
    """The browser-side callback that shows a typed message and locks the input with
    `control_updates(busy=True)`: the reply's queued event then starts without a server round
    trip before it (a round trip off the UI's time to first token). An empty message changes
    nothing, so the reply finds no question to answer. Its list of values follows `outputs`,
    the names of the chatbot and of the controls."""
    locked: Mapping[str, Any] = control_updates(busy=True)
    locked = {**locked, "msg": {**locked["msg"], "value": ""}}
    added = '[...history, {role: "user", content: [{type: "text", text: message}]}]'

    def values(chat: str, controls: Callable[[str], Any]) -> str:
        return ", ".join(
            chat if name == "chatbot" else json.dumps(controls(name)) for name in outputs
        )

    unchanged = values("history", lambda _: {"__type__": "update"})
    return f"""
(message, history) => {{
  if (!message.trim()) return [{unchanged}];
  return [{values(added, locked.__getitem__)}];
}}
"""


def launch_options(settings: ChatUISettings) -> dict[str, Any]:
    """Keyword arguments of `Blocks.launch` for these settings (theme and CSS go here in v6)."""
    return {
        "server_name": settings.host,
        "server_port": settings.port,
        "auth": settings.auth_credentials(),
        "show_error": True,
        "theme": THEME,
        "css": CSS,
        "max_file_size": "10mb",
        # The probes' route: answered by the server's event loop without rendering the page
        # (and without the login, which a kubelet cannot pass).
        "app_kwargs": {"routes": [Route("/healthz", _healthz, methods=["GET"])]},
    }


async def _healthz(_: Request) -> JSONResponse:
    """The process serves HTTP."""
    return JSONResponse({"status": "ok"})
