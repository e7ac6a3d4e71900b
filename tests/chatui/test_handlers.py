"""The UI callbacks, called directly with a scripted backend client."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import gradio as gr
import httpx
import pytest

from chatui.clients import (
    BackendHTTPError,
    BackendStatus,
    BackendUnavailable,
    Finished,
    InferClient,
    StreamInterrupted,
    TextDelta,
    ToolCalls,
    Usage,
)
from chatui.conversation import (
    assistant_message,
    export_json,
    is_json_reply,
    is_notice,
    notice_message,
    reply_text,
    text_of,
    to_record,
    tool_call_message,
    tool_calls_of,
    user_message,
)
from chatui.handlers import (
    NEXT_IS_RESULT,
    SKIP,
    ChatHandlers,
    ExportFolder,
    Updates,
    status_markdown,
    tool_choice_update,
)
from chatui.settings import ChatUISettings
from chatui.tools import FunctionCall, ToolCall, ToolRequest
from tests.chatui.fakes import ScriptedClient

SYSTEM = "Be brief."
TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {}}}]
WEATHER = ToolCall(
    id="call_1", function=FunctionCall(name="get_weather", arguments='{"city":"Oslo"}')
)


@pytest.fixture
def client() -> ScriptedClient:
    """The scripted backend."""
    return ScriptedClient()


@pytest.fixture
def handlers(client: ScriptedClient, tmp_path: Path) -> ChatHandlers:
    """Callbacks over the scripted backend, exporting into a temporary folder."""
    settings = ChatUISettings(default_context_window=2048, system_prompt="Default prompt.")
    return ChatHandlers(settings, client, ExportFolder(tmp_path))


async def run(
    handlers: ChatHandlers,
    history: list[dict[str, Any]],
    max_tokens: float = 128,
    json_output: bool = False,
    tools: str = "",
    tool_choice: str = "required",
) -> list[Updates]:
    """Every update (of the chatbot and the stats line) of one reply."""
    updates = handlers.respond(
        history, SYSTEM, 0.2, 0.9, max_tokens, json_output, tools, tool_choice
    )
    return [u async for u in updates]


def texts(history: list[dict[str, Any]]) -> list[tuple[str, str]]:
    return [(m["role"], text_of(m["content"])) for m in history]


async def test_reply_streams_into_the_history_and_ends_with_stats(
    handlers: ChatHandlers, client: ScriptedClient
) -> None:
    client.enqueue_text("Hel", "lo", "!")
    history = [user_message("Hi")]
    updates = await run(handlers, history)
    shown = [texts(u["chatbot"])[-1] for u in updates]
    assert shown == [
        ("user", "Hi"),
        ("assistant", "Hel"),
        ("assistant", "Hello"),
        ("assistant", "Hello!"),
        ("assistant", "Hello!"),
    ]
    final_history, stats = updates[-1]["chatbot"], updates[-1]["stats"]
    assert texts(final_history) == [("user", "Hi"), ("assistant", "Hello!")]
    assert "s to first token" in stats and "3 tokens" in stats
    messages, options = client.calls[0]
    assert messages == [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "Hi"}]
    assert (options.temperature, options.top_p, options.max_tokens) == (0.2, 0.9, 128)
    assert history == [user_message("Hi")]  # the input list is not mutated


async def test_the_whole_conversation_goes_to_the_backend_each_turn(
    handlers: ChatHandlers, client: ScriptedClient
) -> None:
    history = [user_message("My name is Ada."), assistant_message("Hi Ada!")]
    await run(handlers, [*history, user_message("What is my name?")])
    assert [m["content"] for m in client.calls[0][0]] == [
        SYSTEM,
        "My name is Ada.",
        "Hi Ada!",
        "What is my name?",
    ]


@pytest.mark.parametrize(
    ("error", "title"),
    [
        (BackendUnavailable("Could not connect to the backend at http://b."), "unreachable"),
        (BackendHTTPError("The prompt is too long.", status_code=400), "HTTP 400"),
        (BackendHTTPError("The model is still loading.", status_code=503), "HTTP 503"),
    ],
)
async def test_backend_errors_become_a_notice_and_keep_the_history(
    handlers: ChatHandlers, client: ScriptedClient, error: Exception, title: str
) -> None:
    client.enqueue(error)
    history = [user_message("one"), assistant_message("1"), user_message("two")]
    final = (await run(handlers, history))[-1]["chatbot"]
    assert final[:3] == history
    assert len(final) == 4 and is_notice(final[3])
    assert title in final[3]["metadata"]["title"]
    assert str(error) in text_of(final[3]["content"])


async def test_a_refused_key_says_which_setting_to_fix(
    handlers: ChatHandlers, client: ScriptedClient
) -> None:
    client.enqueue(BackendHTTPError("Invalid API key.", status_code=401))
    final = (await run(handlers, [user_message("hello")]))[-1]["chatbot"]
    assert "API key" in final[1]["metadata"]["title"]
    content = text_of(final[1]["content"])
    assert "Invalid API key." in content and "CHATUI_API_KEY" in content


async def test_a_cut_stream_keeps_the_partial_answer_and_marks_it(
    handlers: ChatHandlers, client: ScriptedClient
) -> None:
    client.enqueue(TextDelta("The capital is "), StreamInterrupted("The stream was cut."))
    final = (await run(handlers, [user_message("Capital of France?")]))[-1]["chatbot"]
    assert texts(final)[:2] == [("user", "Capital of France?"), ("assistant", "The capital is ")]
    assert final[2]["metadata"]["title"] == "⚠️ Answer cut off"
    assert "The stream was cut." in text_of(final[2]["content"])


async def test_the_next_message_after_an_error_works_without_the_notice(
    handlers: ChatHandlers, client: ScriptedClient
) -> None:
    client.enqueue(BackendUnavailable("down"))
    failed = (await run(handlers, [user_message("first try")]))[-1]["chatbot"]
    client.enqueue_text("Back!")
    final = (await run(handlers, [*failed, user_message("again")]))[-1]["chatbot"]
    assert texts(final)[-1] == ("assistant", "Back!")
    # The unanswered question and the new one are joined: chat templates need alternation.
    assert client.calls[1][0][1:] == [{"role": "user", "content": "first try\n\nagain"}]


async def test_json_output_streams_raw_text_then_shows_a_code_block(
    handlers: ChatHandlers, client: ScriptedClient
) -> None:
    client.enqueue_text('{"name":', ' "Ada", "born": 1815}')
    updates = await run(handlers, [user_message("Who?")], json_output=True)
    assert client.calls[0][1].json_output is True
    assert texts(updates[1]["chatbot"])[-1] == ("assistant", '{"name":')  # streamed as it comes
    final, stats = updates[-1]["chatbot"], updates[-1]["stats"]
    assert texts(final)[-1] == ("assistant", '```json\n{\n  "name": "Ada",\n  "born": 1815\n}\n```')
    assert "2 tokens" in stats
    # The next turn gives the model its reply as it wrote it, not the code block.
    await run(handlers, [*final, user_message("And?")], json_output=True)
    assert client.calls[1][0][2] == {
        "role": "assistant",
        "content": '{"name": "Ada", "born": 1815}',
    }


async def test_a_json_reply_cut_at_max_tokens_stays_as_it_came(
    handlers: ChatHandlers, client: ScriptedClient
) -> None:
    client.enqueue(TextDelta('{"story": "Once upon'), Finished("length"))
    last = (await run(handlers, [user_message("Story?")], json_output=True))[-1]
    final, stats = last["chatbot"], last["stats"]
    assert texts(final)[-1] == ("assistant", '{"story": "Once upon')
    assert not is_json_reply(final[-1]) and "max tokens limit" in stats


async def test_without_json_output_nothing_changes(
    handlers: ChatHandlers, client: ScriptedClient
) -> None:
    client.enqueue_text('{"a": 1}')
    final = (await run(handlers, [user_message("q")]))[-1]["chatbot"]
    assert client.calls[0][1].json_output is False and client.calls[0][1].tools is None
    assert final[-1] == assistant_message('{"a": 1}')


async def test_json_output_over_the_infer_api_is_a_notice_and_nothing_is_sent(
    tmp_path: Path,
) -> None:
    requests: list[httpx.Request] = []

    def backend(request: httpx.Request) -> httpx.Response:
        requests.append(request)
        return httpx.Response(200, json=["not JSON"])

    client = InferClient(
        "http://infer.test", timeout=httpx.Timeout(1.0), transport=httpx.MockTransport(backend)
    )
    settings = ChatUISettings(backend_api="infer")
    handlers = ChatHandlers(settings, client, ExportFolder(tmp_path))
    history = [user_message("one"), assistant_message("1"), user_message("two")]
    final = (await run(handlers, history, json_output=True))[-1]["chatbot"]
    assert final[:3] == history and is_notice(final[3])
    assert final[3]["metadata"]["title"] == "⚠️ Not possible with this backend API"
    content = text_of(final[3]["content"])
    assert "JSON output" in content and "CHATUI_BACKEND_API=openai" in content
    assert "change the setting" in content
    assert all(r.url.path != "/infer" for r in requests)  # health checks only
    final = (await run(handlers, history))[-1]["chatbot"]  # unticked, the same question is answered
    assert texts(final)[-1] == ("assistant", "not JSON")


async def test_a_tool_call_shows_when_it_comes_and_the_next_message_is_its_result(
    handlers: ChatHandlers, client: ScriptedClient
) -> None:
    usage = Usage(prompt_tokens=50, completion_tokens=12, total_tokens=62)
    client.enqueue(ToolCalls((WEATHER,)), Finished("tool_calls", usage))
    tools = json.dumps(TOOLS)
    updates = await run(handlers, [user_message("Weather in Oslo?")], tools=tools)
    assert client.calls[0][1].tools == ToolRequest(tuple(TOOLS), "required")
    assert len(updates) == 2  # waiting, then the calls: they come whole at the end
    assert updates[0]["stats"] == "⏳ Waiting for the tool call (it comes whole)…"
    final, stats = updates[-1]["chatbot"], updates[-1]["stats"]
    assert final[1] == tool_call_message([WEATHER])
    assert text_of(final[1]["content"]) == (
        '🛠️ Tool call `get_weather`\n\n```json\n{\n  "city": "Oslo"\n}\n```'
    )
    assert "12 tokens" in stats and NEXT_IS_RESULT in stats
    assert "to first token" not in stats and "tok/s" not in stats  # no stream to time
    await run(handlers, [*final, user_message("-3 °C")], tools=tools, tool_choice="get_weather")
    messages, options = client.calls[1]
    assert messages[2:] == [
        {"role": "assistant", "content": None, "tool_calls": [WEATHER.model_dump()]},
        {"role": "tool", "tool_call_id": "call_1", "content": "-3 °C"},
    ]
    assert options.tools == ToolRequest(tuple(TOOLS), "get_weather")


async def test_a_call_cut_at_max_tokens_shows_as_text(
    handlers: ChatHandlers, client: ScriptedClient
) -> None:
    # The backend sends what the calls got to as text when max_tokens cuts them.
    client.enqueue(TextDelta('{"tool_calls": [{"name": "get_w'), Finished("length"))
    last = (await run(handlers, [user_message("q")], tools=json.dumps(TOOLS)))[-1]
    final, stats = last["chatbot"], last["stats"]
    assert final[-1] == assistant_message('{"tool_calls": [{"name": "get_w')
    assert "max tokens limit" in stats and NEXT_IS_RESULT not in stats


@pytest.mark.parametrize(
    ("tools", "tool_choice", "json_output", "says"),
    [
        ('[{"type": "function", ', "required", False, "Tools is not valid JSON"),
        ('{"type": "function"}', "required", False, "Tools must be a JSON list of"),
        (json.dumps(TOOLS), "get_news", False, "'get_news' is not a function of Tools"),
        (json.dumps(TOOLS), "required", True, "JSON output and tools cannot be combined"),
    ],
)
async def test_tools_that_cannot_be_sent_are_a_notice_and_nothing_is_sent(
    handlers: ChatHandlers,
    client: ScriptedClient,
    tools: str,
    tool_choice: str,
    json_output: bool,
    says: str,
) -> None:
    history = [user_message("one"), assistant_message("1"), user_message("two")]
    updates = await run(
        handlers, history, json_output=json_output, tools=tools, tool_choice=tool_choice
    )
    final = updates[-1]["chatbot"]
    assert client.calls == [] and final[:3] == history and is_notice(final[3])
    assert final[3]["metadata"]["title"] == "⚠️ Tools setting not usable"
    assert says in text_of(final[3]["content"]) and "then press Regenerate" in text_of(
        final[3]["content"]
    )
    # With Tools emptied, the same question goes.
    final = (await run(handlers, history))[-1]["chatbot"]
    assert texts(final)[-1] == ("assistant", "ok") and client.calls[0][1].tools is None


def test_the_tool_choice_follows_the_tools_box() -> None:
    two = json.dumps([*TOOLS, {"type": "function", "function": {"name": "get_time"}}])
    update = tool_choice_update(two, "required")
    assert (update["choices"], update["value"]) == (
        ["auto", "required", "get_weather", "get_time"],
        "required",
    )
    assert tool_choice_update(two, "get_time")["value"] == "get_time"  # still defined: kept
    assert tool_choice_update(json.dumps(TOOLS), "get_time")["value"] == "auto"
    assert tool_choice_update("", "get_time")["choices"] == ["auto", "required"]
    assert tool_choice_update('[{"type": "func', "get_time") is SKIP  # while typing


async def test_other_exceptions_propagate(handlers: ChatHandlers, client: ScriptedClient) -> None:
    client.enqueue(TextDelta("a"), RuntimeError("a bug"))
    with pytest.raises(RuntimeError, match="a bug"):
        await run(handlers, [user_message("q")])


async def test_long_conversations_are_trimmed_and_the_user_is_told(
    handlers: ChatHandlers, client: ScriptedClient
) -> None:
    client.status = BackendStatus("ready", "m", context_window=400)
    history = []
    for i in range(6):
        history += [user_message(f"question {i} " + "x" * 150), assistant_message("y" * 150)]
    updates = await run(handlers, [*history, user_message("last")], max_tokens=100)
    sent = client.calls[0][0]
    assert sent[0]["role"] == "system" and sent[-1]["content"] == "last"
    dropped = len(history) + 2 - len(sent)
    assert dropped > 0 and dropped % 2 == 0
    assert f"{dropped} older messages were left out" in updates[-1]["stats"]


async def test_the_fallback_window_applies_when_the_backend_reports_none(
    handlers: ChatHandlers, client: ScriptedClient
) -> None:
    client.status = BackendStatus("ready", "m", context_window=None)
    history = [user_message("x" * 3000), assistant_message("y" * 3000), user_message("z")]
    await run(handlers, history, max_tokens=100)  # fallback window: 2048 tokens ≈ 6000 chars
    assert [m["content"] for m in client.calls[0][0]] == [SYSTEM, "z"]


async def test_nothing_to_answer_skips(handlers: ChatHandlers, client: ScriptedClient) -> None:
    assert await run(handlers, [user_message("q"), assistant_message("a")]) == [{}]
    assert await run(handlers, []) == [{}]
    assert client.calls == []


async def test_stopping_closes_the_backend_stream(
    handlers: ChatHandlers, client: ScriptedClient
) -> None:
    client.enqueue_text(*["word "] * 100)
    updates = handlers.respond([user_message("long")], SYSTEM, 0.7, 0.9, 512, False, "", "required")
    await anext(updates)  # "waiting for the first token"
    await anext(updates)  # the first words: the stream is open and `respond` waits at a yield
    # Stop makes Gradio close the callback's generator (`queueing.reset_iterators` awaits
    # `aclose()` on it). The backend stream must be closed by then, not later when the event
    # loop's async-generator hook gets to the abandoned stream: no other await in between.
    await updates.aclose()
    assert client.closed == 1


def test_regenerate_drops_the_answer_and_notices(handlers: ChatHandlers) -> None:
    history = [
        user_message("q1"),
        assistant_message("a1"),
        user_message("q2"),
        assistant_message("partial"),
        notice_message("⚠️ Answer cut off", "cut"),
    ]
    updates = handlers.regenerate(history)
    assert updates["chatbot"] == history[:3]
    assert updates["stop"]["interactive"] is True  # Stop is enabled while the reply runs
    assert updates["send"]["interactive"] is False and updates["msg"]["interactive"] is False
    assert handlers.regenerate([]) == {}  # nothing changes


def test_undo_removes_the_last_turn_and_returns_the_question(handlers: ChatHandlers) -> None:
    history = [
        user_message("q1"),
        assistant_message("a1"),
        user_message("q2"),
        assistant_message("a2"),
    ]
    assert handlers.undo(history) == {"chatbot": history[:2], "msg": "q2"}
    assert handlers.undo([]) == {}


def test_edit_replaces_the_message_and_forgets_what_followed(handlers: ChatHandlers) -> None:
    history = [
        user_message("q1"),
        assistant_message("a1"),
        user_message("q2"),
        assistant_message("a2"),
    ]
    edit = gr.EditData(None, {"index": 0, "value": "q1, edited", "previous_value": "q1"})
    updates = handlers.edit(history, edit)
    assert updates["chatbot"] == [user_message("q1, edited")]
    assert updates["stop"]["interactive"] is True and updates["undo"]["interactive"] is False


def test_example_starts_a_chat(handlers: ChatHandlers) -> None:
    select = gr.SelectData(None, {"index": 1, "value": {"text": "Explain batching."}})
    updates = handlers.example(select)
    assert updates["chatbot"] == [user_message("Explain batching.")]
    assert updates["stop"]["interactive"] is True and updates["send"]["interactive"] is False


def test_finish_turn_saves_and_exports_then_keeps_id_and_title(handlers: ChatHandlers) -> None:
    history = [user_message("Hello there"), assistant_message("Hi!")]
    turn = handlers.finish_turn(history, None, [], SYSTEM)
    conversation_id = turn["conversation_id"]
    assert conversation_id and turn["title"] == "Hello there" and turn["system_prompt"] == SYSTEM
    assert turn["conversations"]["choices"] == [("Hello there", conversation_id)]
    assert turn["conversations"]["value"] == conversation_id
    assert json.loads(Path(turn["export_json"]["value"]).read_text()) == json.loads(
        export_json(to_record(history, "Hello there", SYSTEM))
    )
    assert "### Assistant\n\nHi!" in Path(turn["export_md"]["value"]).read_text()
    assert turn["export_md"]["interactive"] is turn["export_json"]["interactive"] is True
    assert turn["msg"]["interactive"] is True and turn["stop"]["interactive"] is False
    longer = [*history, user_message("More?"), assistant_message("Sure.")]
    again = handlers.finish_turn(longer, conversation_id, turn["saved"], SYSTEM)
    assert again["conversation_id"] == conversation_id and again["title"] == "Hello there"
    assert len(again["saved"]) == 1 and len(again["saved"][0]["messages"]) == 4


def test_saving_after_undo_leaves_the_controls(handlers: ChatHandlers) -> None:
    history = [user_message("Hello there"), assistant_message("Hi!")]
    saved = handlers.save_turn(history, None, [], SYSTEM)
    finished = handlers.finish_turn(history, None, [], SYSTEM)
    assert set(finished) - set(saved) == {"msg", "send", "stop", "regenerate", "undo"}
    assert saved["title"] == finished["title"] == "Hello there"


def test_a_saved_json_reply_keeps_its_text_and_reopens_as_a_code_block(
    handlers: ChatHandlers,
) -> None:
    history = [user_message("q"), assistant_message('{"a":1}', json_output=True)]
    turn = handlers.finish_turn(history, None, [], SYSTEM)
    assert turn["saved"][0]["messages"][1]["content"] == '{"a":1}'
    exported = json.loads(Path(turn["export_json"]["value"]).read_text())
    assert exported["messages"][1]["content"] == '{"a":1}'
    reopened = handlers.open_conversation(turn["conversation_id"], turn["saved"])["chatbot"]
    assert reopened == history and reply_text(reopened[1]) == '{"a":1}'


def test_a_saved_tool_call_keeps_its_calls_and_reopens_readable(handlers: ChatHandlers) -> None:
    history = [user_message("q"), tool_call_message([WEATHER])]
    turn = handlers.finish_turn(history, None, [], SYSTEM)
    exported = json.loads(Path(turn["export_json"]["value"]).read_text())["messages"][1]
    assert exported["tool_calls"] == [WEATHER.model_dump()]
    reopened = handlers.open_conversation(turn["conversation_id"], turn["saved"])["chatbot"]
    assert reopened == history and tool_calls_of(reopened[1]) == [WEATHER]


def test_finish_turn_without_messages_saves_nothing(handlers: ChatHandlers) -> None:
    turn = handlers.finish_turn([], None, [], SYSTEM)
    assert (turn["conversation_id"], turn["saved"], turn["title"]) == (None, [], "")
    assert "system_prompt" not in turn  # the prompt the user has set stays
    no_file = gr.update(value=None, interactive=False)
    assert turn["export_md"] == turn["export_json"] == no_file


def saved_chat(handlers: ChatHandlers, *texts_: str) -> tuple[str, list[dict[str, Any]]]:
    history = [
        user_message(t) if i % 2 == 0 else assistant_message(t) for i, t in enumerate(texts_)
    ]
    turn = handlers.finish_turn(history, None, [], "Custom prompt.")
    return turn["conversation_id"], turn["saved"]


def test_open_and_new_chat(handlers: ChatHandlers) -> None:
    conversation_id, saved = saved_chat(handlers, "q", "a")
    opened = handlers.open_conversation(conversation_id, saved)
    assert texts(opened["chatbot"]) == [("user", "q"), ("assistant", "a")]
    assert (opened["stats"], opened["conversation_id"]) == ("", conversation_id)
    assert (opened["title"], opened["system_prompt"]) == ("q", "Custom prompt.")
    new = handlers.new_chat(saved)
    assert (new["chatbot"], new["stats"], new["conversation_id"]) == ([], "", None)
    assert new["conversations"]["value"] is None and new["title"] == ""
    assert new["saved"] == saved  # the saved chats stay
    assert "system_prompt" not in new  # the prompt the user has set stays


def test_rename_and_delete(handlers: ChatHandlers) -> None:
    conversation_id, saved = saved_chat(handlers, "q", "a")
    renamed = handlers.rename(conversation_id, "  My   chat ", saved)
    assert renamed["title"] == "My chat"
    assert renamed["conversations"]["choices"] == [("My chat", conversation_id)]
    deleted = handlers.delete(conversation_id, renamed["saved"])
    assert (deleted["chatbot"], deleted["conversation_id"], deleted["saved"]) == ([], None, [])
    assert deleted["conversations"]["choices"] == []


def test_rename_before_saving_warns(handlers: ChatHandlers) -> None:
    with pytest.warns(UserWarning, match="only saved conversations"):
        handlers.rename(None, "title", [])


def test_import_adds_and_opens_the_conversation(handlers: ChatHandlers, tmp_path: Path) -> None:
    record = to_record([user_message("imported q"), assistant_message("a")], "Imported", "Sys.")
    path = tmp_path / "chat.json"
    path.write_text(export_json(record))
    existing_id, saved = saved_chat(handlers, "old", "chat")
    imported = handlers.import_file(str(path), saved)
    assert texts(imported["chatbot"])[0] == ("user", "imported q")
    assert (imported["title"], imported["system_prompt"]) == ("Imported", "Sys.")
    new_id = imported["conversation_id"]
    assert [c for _, c in imported["conversations"]["choices"]] == [new_id, existing_id]
    assert len(imported["saved"]) == 2


def test_a_bad_import_warns_and_changes_nothing(handlers: ChatHandlers, tmp_path: Path) -> None:
    path = tmp_path / "bad.json"
    path.write_text('{"hello": "world"}')
    with pytest.warns(UserWarning, match="Not a conversation"):
        assert handlers.import_file(str(path), []) == {}
    assert handlers.import_file(None, []) == {}


def test_status_lines() -> None:
    assert status_markdown(BackendStatus("ready", "mistral", 8192)) == (
        "🟢 Backend ready · model **mistral** · context 8192 tokens"
    )
    assert "starting" in status_markdown(BackendStatus("loading"))
    gone = status_markdown(BackendStatus("loading", detail="No model replica is running."))
    assert "not ready" in gone and "No model replica is running." in gone
    down = status_markdown(BackendStatus("unreachable", detail="connection refused"))
    assert "unreachable" in down and "connection refused" in down


async def test_health_is_shared_and_cached(handlers: ChatHandlers, client: ScriptedClient) -> None:
    calls = 0
    original = client.health

    async def counting() -> BackendStatus:
        nonlocal calls
        calls += 1
        return await original()

    client.health = counting  # type: ignore[method-assign]
    lines = await asyncio.gather(*(handlers.status() for _ in range(5)))
    assert calls == 1 and all("scripted-model" in line for line in lines)


async def test_chat_api_two_turns(handlers: ChatHandlers, client: ScriptedClient) -> None:
    client.enqueue_text("Hi Ada!")
    first = await handlers.chat("My name is Ada.")
    assert first["reply"] == "Hi Ada!"
    client.enqueue_text("Your name is Ada.")
    second = await handlers.chat("What is my name?", first["history"], max_tokens=32)
    assert second["reply"] == "Your name is Ada."
    assert [m["content"] for m in client.calls[1][0]] == [
        "Default prompt.",
        "My name is Ada.",
        "Hi Ada!",
        "What is my name?",
    ]
    assert client.calls[1][1].max_tokens == 32
    assert len(second["history"]) == 4


async def test_chat_api_json_output_returns_the_reply_as_written(
    handlers: ChatHandlers, client: ScriptedClient
) -> None:
    client.enqueue_text('{"capital":"Paris"}')
    result = await handlers.chat("Capital of France, as JSON?", json_output=True)
    assert client.calls[0][1].json_output is True
    assert result["reply"] == '{"capital":"Paris"}'
    assert result["history"][1] == {"role": "assistant", "content": '{"capital":"Paris"}'}
    await handlers.chat("Again", result["history"])
    assert client.calls[1][1].json_output is False  # the setting's default
    assert client.calls[1][0][2]["content"] == '{"capital":"Paris"}'


async def test_chat_api_is_a_plain_chat_whatever_the_tools_setting(
    client: ScriptedClient, tmp_path: Path
) -> None:
    settings = ChatUISettings(tools=json.dumps(TOOLS))
    handlers = ChatHandlers(settings, client, ExportFolder(tmp_path))
    await handlers.chat("Weather in Oslo?")
    assert client.calls[0][1].tools is None


async def test_chat_api_raises_backend_errors_and_bad_input(
    handlers: ChatHandlers, client: ScriptedClient
) -> None:
    client.enqueue(BackendHTTPError("bad request", status_code=400))
    with pytest.raises(gr.Error, match="bad request"):
        await handlers.chat("hi")
    with pytest.raises(gr.Error, match="history"):
        await handlers.chat("hi", [{"role": "tool", "content": "x"}])
    with pytest.raises(gr.Error, match="empty"):
        await handlers.chat("  ")
