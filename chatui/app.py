"""The Gradio 6 chat UI: layout and event wiring (`build_app`) and launch options.

A reply runs as a queued event; Stop (and New chat, switching, deleting, importing, editing)
cancels it, which closes the HTTP stream to the backend (see `chatui.handlers`).
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

import gradio as gr
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from chatui.clients import ChatClient, create_client
from chatui.handlers import ChatHandlers, ExportFolder, control_updates, tool_choice_update
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

        controls = [msg, send, stop, regenerate, undo]
        view = [conversation_id, saved, conversations, title, system_prompt, export_md, export_json]
        local: dict[str, Any] = {"queue": False, "api_visibility": "private"}
        replies = []

        def answer(start: Any) -> None:
            reply = start.then(
                h.respond,
                [
                    chatbot,
                    *(system_prompt, temperature, top_p, max_tokens, json_output),
                    *(tools, tool_choice),
                ],
                [chatbot, stats],
                concurrency_limit=settings.concurrency_limit,
                concurrency_id="chat",
                show_progress="hidden",
                api_visibility="private",
            )
            reply.then(
                h.finish_turn,
                [chatbot, conversation_id, saved, system_prompt],
                view + controls,
                **local,
            )
            replies.append(reply)

        answer(
            gr.on(
                [msg.submit, send.click],
                None,
                [msg, chatbot],
                [chatbot, *controls],
                js=add_message_js(),
                **local,
            )
        )
        answer(regenerate.click(h.regenerate, [chatbot], [chatbot, *controls], **local))
        answer(chatbot.edit(h.edit, [chatbot], [chatbot, *controls], **local))
        answer(chatbot.example_select(h.example, None, [chatbot, *controls], **local))
        undo.click(h.undo, [chatbot], [chatbot, msg], **local).then(
            h.finish_turn, [chatbot, conversation_id, saved, system_prompt], view, **local
        )
        # Stop, and anything that replaces the chat, cancels the reply being written into it.
        stop.click(h.stopped, None, [stats], cancels=replies, **local)
        chatbot.edit(None, None, None, cancels=replies, **local)
        view_changes = {"outputs": [chatbot, stats, *view], "cancels": replies, **local}
        # The chatbot's own trash button starts a new chat too (the saved one stays).
        gr.on([new_chat.click, chatbot.clear], h.new_chat, [saved], **view_changes)
        conversations.input(h.open_conversation, [conversations, saved], **view_changes)
        delete.click(h.delete, [conversation_id, saved], **view_changes)
        # Queued, unlike the rest: gr.Warning reaches the browser only from queued events.
        import_button.upload(
            h.import_file, [import_button, saved], **{**view_changes, "queue": True}
        )
        gr.on(
            [rename.click, title.submit],
            h.rename,
            [conversation_id, title, saved],
            view,
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


def add_message_js() -> str:
    """The browser-side callback that shows a typed message and locks the input with
    `control_updates(busy=True)`: the reply's queued event then starts without a server round
    trip before it (a round trip off the UI's time to first token). An empty message changes
    nothing, so the reply finds no question to answer."""
    msg, *others = control_updates(busy=True)
    locked = json.dumps([{**msg, "value": ""}, *others])
    return f"""
(message, history) => {{
  if (!message.trim()) return [history, ...Array({1 + len(others)}).fill({{__type__: "update"}})];
  return [[...history, {{role: "user", content: [{{type: "text", text: message}}]}}], ...{locked}];
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
