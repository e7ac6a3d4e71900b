"""The Blocks app: stable element ids, event wiring, and the `/chat` API through a real server."""

from __future__ import annotations

import inspect
import json
import socket
import tempfile
import typing
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import gradio as gr
import httpx
import pytest
from gradio_client import Client
from gradio_client.exceptions import AuthenticationError

from chatui.app import CSS, THEME, add_message_js, build_app, launch_options, named
from chatui.clients import BackendHTTPError
from chatui.conversation import assistant_message, user_message
from chatui.handlers import SKIP, control_updates
from chatui.settings import ChatUISettings
from tests.chatui.fakes import ScriptedClient

ELEM_IDS = ["chatbot", "msg", "send", "stop", "regenerate", "undo", "new-chat", "status", "stats"]


@pytest.fixture
def settings() -> ChatUISettings:
    """Settings with a recognisable concurrency limit."""
    return ChatUISettings(concurrency_limit=7, system_prompt="Be brief.")


@pytest.fixture
def client() -> ScriptedClient:
    """The scripted backend."""
    return ScriptedClient()


@pytest.fixture
def config(settings: ChatUISettings, client: ScriptedClient) -> dict[str, Any]:
    """The app's frontend configuration."""
    return build_app(settings, client).get_config_file()


def components(config: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {c["props"]["elem_id"]: c for c in config["components"] if c["props"].get("elem_id")}


def test_important_elements_have_stable_ids(config: dict[str, Any]) -> None:
    assert set(ELEM_IDS) <= set(components(config))


def test_chatbot_edits_user_messages_and_offers_copy_buttons(config: dict[str, Any]) -> None:
    chatbot = components(config)["chatbot"]["props"]
    assert chatbot["editable"] == "user"
    assert "copy" in chatbot["buttons"] and chatbot["examples"]


@pytest.mark.parametrize("default", [False, True])
def test_settings_offer_a_json_output_toggle_that_every_reply_reads(
    client: ScriptedClient, default: bool
) -> None:
    config = build_app(ChatUISettings(json_output=default), client).get_config_file()
    toggle = components(config)["json-output"]
    assert toggle["type"] == "checkbox" and toggle["props"]["value"] is default
    assert toggle["props"]["label"] == "JSON output"
    replies = [d for d in config["dependencies"] if str(d["api_name"]).startswith("respond")]
    assert len(replies) == 4 and all(toggle["id"] in d["inputs"] for d in replies)


def test_settings_offer_tools_and_a_tool_choice_that_every_reply_reads(
    client: ScriptedClient,
) -> None:
    tools = '[{"type": "function", "function": {"name": "get_weather"}}]'
    settings = ChatUISettings(tools=tools, tool_choice="get_weather")
    config = build_app(settings, client).get_config_file()
    box, choice = components(config)["tools"], components(config)["tool-choice"]
    assert box["type"] == "textbox" and box["props"]["value"] == tools
    assert box["props"]["label"] == "Tools"
    assert choice["type"] == "dropdown" and choice["props"]["value"] == "get_weather"
    assert [c[0] for c in choice["props"]["choices"]] == ["auto", "required", "get_weather"]
    replies = [d for d in config["dependencies"] if str(d["api_name"]).startswith("respond")]
    assert len(replies) == 4
    assert all({box["id"], choice["id"]} <= set(d["inputs"]) for d in replies)
    follows = [
        d
        for d in config["dependencies"]
        if [tuple(t) for t in d["targets"]] == [(box["id"], "change")]
    ]
    assert [(d["inputs"], d["outputs"]) for d in follows] == [
        ([box["id"], choice["id"]], [choice["id"]])
    ]


def test_without_tools_the_choice_is_auto(config: dict[str, Any]) -> None:
    choice = components(config)["tool-choice"]["props"]
    assert components(config)["tools"]["props"]["value"] == ""
    assert choice["value"] == "auto" and [c[0] for c in choice["choices"]] == ["auto", "required"]


def test_only_the_chat_endpoint_is_public(settings: ChatUISettings, client: ScriptedClient) -> None:
    api = build_app(settings, client).get_api_info()
    assert list(api["named_endpoints"]) == ["/chat"]
    params = [p["parameter_name"] for p in api["named_endpoints"]["/chat"]["parameters"]]
    assert params == [
        "message",
        "history",
        "system_prompt",
        "temperature",
        "top_p",
        "max_tokens",
        "json_output",
    ]


def test_replies_share_the_configured_concurrency_limit(
    settings: ChatUISettings, client: ScriptedClient
) -> None:
    demo = build_app(settings, client)
    replies = [fn for fn in demo.fns.values() if (fn.name or "").startswith(("respond", "chat"))]
    assert len(replies) == 5  # send, regenerate, edit, example, and the API
    assert {(fn.concurrency_limit, fn.concurrency_id) for fn in replies} == {(7, "chat")}


def test_stop_cancels_every_reply(config: dict[str, Any]) -> None:
    stop = (components(config)["stop"]["id"], "click")
    deps = config["dependencies"]
    cancelled = {i for d in deps if stop in map(tuple, d["targets"]) for i in d["cancels"]}
    replies = {d["id"] for d in deps if str(d["api_name"]).startswith("respond")}
    assert len(replies) == 4 and cancelled == replies


def test_launch_options_carry_theme_css_errors_and_auth() -> None:
    options = launch_options(ChatUISettings(auth="ada:lovelace", port=7999, host="0.0.0.0"))
    assert (options["server_name"], options["server_port"]) == ("0.0.0.0", 7999)
    assert options["auth"] == ("ada", "lovelace")
    assert options["show_error"] is True
    assert options["theme"] is THEME and options["css"] == CSS


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextmanager
def serve(settings: ChatUISettings, client: ScriptedClient) -> Iterator[str]:
    """The app served over HTTP on a free port, as `python -m chatui` would; yields its URL."""
    demo = build_app(settings, client)
    options = {**launch_options(settings), "server_port": free_port(), "quiet": True}
    _, url, _ = demo.launch(prevent_thread_lock=True, **options)
    try:
        yield url
    finally:
        demo.close()


@pytest.fixture
def served(settings: ChatUISettings, client: ScriptedClient) -> Iterator[str]:
    """The URL of the app served with `settings`."""
    with serve(settings, client) as url:
        yield url


def test_probes_get_a_cheap_health_route_that_needs_no_login(client: ScriptedClient) -> None:
    with serve(ChatUISettings(auth="ada:lovelace"), client) as url:
        health = httpx.get(url + "healthz", timeout=5)
        config = httpx.get(url + "config", timeout=5)
    assert health.status_code == 200 and health.json() == {"status": "ok"}
    assert config.status_code == 401  # the app itself stays behind the login


def test_gradio_client_two_turn_chat(served: str, client: ScriptedClient) -> None:
    api = Client(served, verbose=False)
    client.enqueue_text("Hi Ada!")
    first = api.predict("My name is Ada.", [], api_name="/chat")
    client.enqueue_text("You are Ada.")
    second = api.predict("Who am I?", first["history"], api_name="/chat")
    assert (first["reply"], second["reply"]) == ("Hi Ada!", "You are Ada.")
    sent = [m["content"] for m in client.calls[1][0]]
    assert sent == ["Be brief.", "My name is Ada.", "Hi Ada!", "Who am I?"]


def test_gradio_client_json_output_defaults_to_the_setting(
    served: str, client: ScriptedClient
) -> None:
    api = Client(served, verbose=False)
    client.enqueue_text('{"a":1}')
    assert api.predict("hi", json_output=True, api_name="/chat")["reply"] == '{"a":1}'
    api.predict("hi", api_name="/chat")
    assert [options.json_output for _, options in client.calls] == [True, False]


def test_gradio_client_sees_backend_errors(served: str, client: ScriptedClient) -> None:
    client.enqueue(BackendHTTPError("The prompt is too long.", status_code=400))
    with pytest.raises(gr.exceptions.AppError, match="The prompt is too long"):
        Client(served, verbose=False).predict("hi", api_name="/chat")


def test_login_is_required_when_auth_is_set(client: ScriptedClient) -> None:
    with serve(ChatUISettings(auth="ada:lovelace"), client) as url:
        with pytest.raises(AuthenticationError):
            Client(url, verbose=False)
        api = Client(url, auth=("ada", "lovelace"), verbose=False)
        assert api.predict("hi", api_name="/chat")["reply"] == "ok"


def wired(demo: gr.Blocks, name: str) -> Any:
    """The first event function of `demo` that runs the handler `name`."""
    return next(fn for fn in demo.fns.values() if fn.name == name)


def by_name(updates: dict[Any, Any]) -> dict[str, Any]:
    """An event function's `{component: value}` result keyed by each component's name: its
    elem_id (dashes as underscores), or the name of the one state of its kind."""
    states = {gr.BrowserState: "saved", gr.State: "conversation_id"}
    return {
        c.elem_id.replace("-", "_") if c.elem_id else states[type(c)]: v for c, v in updates.items()
    }


def test_handlers_update_the_components_of_their_names(
    settings: ChatUISettings, client: ScriptedClient, tmp_path: Path, monkeypatch: Any
) -> None:
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # the exports go there
    demo = build_app(settings, client)
    history = [user_message("q"), assistant_message("a")]
    regenerated = by_name(wired(demo, "regenerate").fn(history))
    assert regenerated["chatbot"] == history[:1]
    assert (regenerated["stop"]["interactive"], regenerated["send"]["interactive"]) == (True, False)
    assert by_name(wired(demo, "undo").fn(history)) == {"chatbot": [], "msg": "q"}
    assert by_name(wired(demo, "regenerate").fn([])) == dict.fromkeys(regenerated, SKIP)
    turn = by_name(wired(demo, "finish_turn").fn(history, None, [], "Be brief."))
    assert turn["title"] == "q" and turn["system_prompt"] == "Be brief."
    assert turn["conversation_id"] and turn["saved"][0]["id"] == turn["conversation_id"]
    assert turn["conversations"]["value"] == turn["conversation_id"]
    assert Path(turn["export_md"]["value"]).parent.parent == tmp_path / "chatui-exports"
    assert turn["msg"]["interactive"] is True
    assert turn["stop"]["interactive"] is False
    after_undo = by_name(wired(demo, "save_turn").fn(history, None, [], "Be brief."))
    assert set(turn) - set(after_undo) == {"msg", "send", "stop", "regenerate", "undo"}
    new = by_name(wired(demo, "new_chat").fn(turn["saved"]))
    assert (new["chatbot"], new["stats"], new["system_prompt"]) == ([], "", SKIP)


async def test_replies_stream_into_the_chatbot_and_stats_and_stop_closes_the_stream(
    settings: ChatUISettings, client: ScriptedClient
) -> None:
    client.enqueue_text(*["word "] * 100)
    respond = wired(build_app(settings, client), "respond").fn
    updates = respond([user_message("long")], "Be brief.", 0.7, 0.9, 512, False, "", "auto")
    waiting = by_name(await anext(updates))
    assert waiting == {
        "chatbot": [user_message("long")],
        "stats": "⏳ Waiting for the first token…",
    }
    writing = by_name(await anext(updates))
    assert writing["chatbot"][-1] == assistant_message("word ") and "Writing" in writing["stats"]
    await updates.aclose()  # as Gradio does when Stop cancels the event
    assert client.closed == 1


def test_handlers_keep_the_parameters_gradio_fills_in(
    settings: ChatUISettings, client: ScriptedClient
) -> None:
    demo = build_app(settings, client)
    assert typing.get_type_hints(wired(demo, "edit").fn)["edit"] is gr.EditData
    assert typing.get_type_hints(wired(demo, "example").fn)["example"] is gr.SelectData
    for name in ["finish_turn", "save_turn", "new_chat", "open_conversation", "import_file"]:
        assert "request" in inspect.signature(wired(demo, name).fn).parameters
    assert inspect.isasyncgenfunction(wired(demo, "respond").fn)


def test_an_update_of_a_component_outside_the_outputs_is_an_error() -> None:
    chatbot, stats = gr.Chatbot(), gr.Markdown()
    event = named(lambda: {"chatbot": [], "stats": "x"}, {"chatbot": chatbot})
    assert event["outputs"] == [chatbot]
    with pytest.raises(ValueError, match=r"updates \['stats'\], not outputs of its event"):
        event["fn"]()
    partial = named(lambda: {"stats": "x"}, {"chatbot": chatbot, "stats": stats})
    assert partial["fn"]() == {chatbot: SKIP, stats: "x"}


def test_the_browser_side_send_follows_the_output_names() -> None:
    js = add_message_js(("chatbot", "msg", "send", "stop", "regenerate", "undo"))
    locked = "[...history, " + js.split("return [[...history, ")[1]
    busy = control_updates(busy=True)
    assert json.dumps({**busy["msg"], "value": ""}) in locked
    assert locked.index(json.dumps(busy["send"])) < locked.index(json.dumps(busy["stop"]))
    with pytest.raises(KeyError):
        add_message_js(("chatbot", "stats"))
