"""Conversation data: history conversion, context trimming, export/import, saved lists, stats."""

from __future__ import annotations

import json

import gradio as gr
import pytest

from chatui.conversation import (
    AnswerStats,
    ConversationImportError,
    assistant_message,
    calls_markdown,
    choices,
    dump_saved,
    estimate_tokens,
    export_json,
    export_markdown,
    fenced,
    find,
    fit_context,
    import_json,
    is_json_reply,
    is_notice,
    is_tool_call,
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
    tool_calls_of,
    trim_note,
    user_message,
)
from chatui.tools import FunctionCall, ToolCall

# A JSON reply as a model writes it: compact, a non-ASCII character, backticks in a string.
RAW_JSON = '{"city":"Zürich","note":"```x```", "tags":[1,2]}'
PRETTY_JSON = """{
  "city": "Zürich",
  "note": "```x```",
  "tags": [
    1,
    2
  ]
}"""


def parts(*texts: str) -> list[dict[str, str]]:
    """Content as Gradio 6 hands it to callbacks: a list of text parts."""
    return [{"type": "text", "text": t} for t in texts]


def test_text_of_accepts_strings_parts_and_skips_files() -> None:
    file_part = {"type": "file", "file": {"path": "/tmp/x.png"}}
    assert text_of("plain") == "plain"
    assert text_of(parts("a", "b")) == "ab"
    assert text_of([*parts("see "), file_part, *parts("this")]) == "see this"
    assert text_of({"type": "text", "text": "one"}) == "one"
    assert text_of(None) == ""


def test_to_openai_puts_the_system_prompt_first_and_reads_list_of_parts() -> None:
    history = [
        {"role": "user", "content": parts("Hi, I am ", "Ada."), "metadata": None},
        {"role": "assistant", "content": parts("Hello Ada!"), "metadata": None},
        {"role": "user", "content": "What is my name?"},
    ]
    assert to_openai(history, "  Be brief. ") == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi, I am Ada."},
        {"role": "assistant", "content": "Hello Ada!"},
        {"role": "user", "content": "What is my name?"},
    ]


def test_to_openai_without_system_prompt_starts_with_the_user() -> None:
    history = [assistant_message("Welcome!"), user_message("hi")]
    assert to_openai(history, "   ") == [{"role": "user", "content": "hi"}]


def test_notices_and_empty_messages_never_reach_the_model_and_roles_alternate() -> None:
    history = [
        user_message("first question"),
        notice_message("⚠️ Backend unreachable", "Could not connect"),
        user_message("second question"),
        assistant_message("partial ans"),
        notice_message("⚠️ Answer cut off", "stream cut"),
        assistant_message("   "),
        user_message("third"),
    ]
    assert to_openai(history, "") == [
        {"role": "user", "content": "first question\n\nsecond question"},
        {"role": "assistant", "content": "partial ans"},
        {"role": "user", "content": "third"},
    ]


def test_notice_metadata_from_the_browser_is_recognised() -> None:
    # The frontend sends metadata back with every key, unset ones as None.
    notice = {"role": "assistant", "content": parts("x"), "metadata": {"title": "⚠️", "log": None}}
    plain = {"role": "assistant", "content": parts("y"), "metadata": {"title": None}}
    assert to_openai([user_message("q"), notice, plain], "") == [
        {"role": "user", "content": "q"},
        {"role": "assistant", "content": "y"},
    ]


def test_a_json_reply_shows_pretty_in_a_code_block_and_keeps_its_own_text() -> None:
    message = assistant_message(RAW_JSON, json_output=True)
    assert text_of(message["content"]) == f"````json\n{PRETTY_JSON}\n````"  # longer than ```
    assert is_json_reply(message) and not is_notice(message)
    assert reply_text(message) == RAW_JSON
    # The model sees its reply as it wrote it, never the block that shows it.
    assert to_openai([user_message("q"), message, user_message("next")], "")[1] == {
        "role": "assistant",
        "content": RAW_JSON,
    }


@pytest.mark.parametrize("text", ['{"cut": "at the max tok', "Sure! Here it is.", ""])
def test_a_reply_that_does_not_parse_stays_as_it_came(text: str) -> None:
    message = assistant_message(text, json_output=True)
    assert message == assistant_message(text) and not is_json_reply(message)


def test_without_json_output_a_json_reply_is_plain_text() -> None:
    message = assistant_message(RAW_JSON)
    assert text_of(message["content"]) == reply_text(message) == RAW_JSON
    assert "metadata" not in message


def test_the_reply_text_survives_the_browser_round_trip() -> None:
    # Gradio keeps only its own metadata keys; `log` is one, shown only on titled messages.
    chatbot = gr.Chatbot()
    history = [user_message("q"), assistant_message(RAW_JSON, json_output=True)]
    payload = chatbot.data_model.model_validate(chatbot.postprocess(history).model_dump())
    back = chatbot.preprocess(payload)
    assert reply_text(back[1]) == RAW_JSON and is_json_reply(back[1])
    assert not is_notice(back[1])


def test_fences_outgrow_the_backticks_of_the_text() -> None:
    assert fenced("x") == "```\nx\n```"
    assert fenced("a ````` b", "json") == "``````json\na ````` b\n``````"


def call(call_id: str, name: str, arguments: str) -> ToolCall:
    return ToolCall(id=call_id, function=FunctionCall(name=name, arguments=arguments))


# Calls as a backend sends them: compact arguments, non-ASCII; arguments a model cut short.
WEATHER = call("call_a1", "get_weather", '{"city":"Zürich","days":[1,2]}')
TIME = call("call_b2", "get_time", '{"zone": "CET"')


def wire(*calls: ToolCall) -> list[dict[str, object]]:
    """The calls in OpenAI's wire format, arguments as they came."""
    return [
        {
            "id": c.id,
            "type": "function",
            "function": {"name": c.function.name, "arguments": c.function.arguments},
        }
        for c in calls
    ]


def test_a_tool_call_shows_each_function_and_its_arguments_as_a_block() -> None:
    message = tool_call_message([WEATHER, TIME])
    shown = text_of(message["content"])
    assert shown == (
        "🛠️ Tool call `get_weather`\n\n```json\n"
        '{\n  "city": "Zürich",\n  "days": [\n    1,\n    2\n  ]\n}\n```'
        '\n\n🛠️ Tool call `get_time`\n\n```\n{"zone": "CET"\n```'  # not JSON: shown as it came
    )
    assert is_tool_call(message) and not is_json_reply(message) and not is_notice(message)
    assert tool_calls_of(message) == [WEATHER, TIME] and reply_text(message) == ""
    assert calls_markdown([WEATHER], "Let me look.").startswith("Let me look.\n\n🛠️")


def test_a_tool_call_goes_back_as_it_came_and_the_next_message_is_its_result() -> None:
    history = [
        user_message("Weather and time in Zürich?"),
        tool_call_message([WEATHER, TIME]),
        user_message("  18 °C, 14:00  "),
        tool_call_message([WEATHER], "Once more."),
        user_message("19 °C"),
        notice_message("⚠️ Answer cut off", "stream cut"),
        user_message("19 °C, sunny"),
    ]
    assert to_openai(history, "Be brief.") == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Weather and time in Zürich?"},
        {"role": "assistant", "content": None, "tool_calls": wire(WEATHER, TIME)},
        {"role": "tool", "tool_call_id": "call_a1", "content": "18 °C, 14:00"},
        {"role": "tool", "tool_call_id": "call_b2", "content": "18 °C, 14:00"},
        {"role": "assistant", "content": "Once more.", "tool_calls": wire(WEATHER)},
        # A second message before the next reply (the first got an error) joins the result.
        {"role": "tool", "tool_call_id": "call_a1", "content": "19 °C\n\n19 °C, sunny"},
    ]


def test_after_the_results_the_conversation_goes_on_as_usual() -> None:
    history = [
        user_message("Weather?"),
        tool_call_message([WEATHER]),
        user_message("18 °C"),
        assistant_message("It is 18 °C in Zürich."),
        user_message("Thanks"),
    ]
    assert [m["role"] for m in to_openai(history, "")] == [
        "user",
        "assistant",
        "tool",
        "assistant",
        "user",
    ]


def test_a_tool_call_survives_the_browser_round_trip() -> None:
    chatbot = gr.Chatbot()
    history = [user_message("q"), tool_call_message([WEATHER]), user_message("18 °C")]
    payload = chatbot.data_model.model_validate(chatbot.postprocess(history).model_dump())
    back = chatbot.preprocess(payload)
    assert to_openai(back, "") == to_openai(history, "")
    assert tool_calls_of(back[1]) == [WEATHER] and not is_notice(back[1])


def test_calls_count_towards_the_context_window() -> None:
    sent = to_openai([user_message("q"), tool_call_message([WEATHER])], "")[1]
    assert estimate_tokens(sent) >= len(json.dumps(sent["tool_calls"])) / 3


def conversation(turns: int, chars: int = 300) -> list[dict[str, str]]:
    """System prompt, `turns` question/answer pairs, and a final question."""
    messages = [{"role": "system", "content": "S" * 30}]
    for i in range(turns):
        messages.append({"role": "user", "content": f"q{i} " + "u" * chars})
        messages.append({"role": "assistant", "content": f"a{i} " + "a" * chars})
    messages.append({"role": "user", "content": "latest question"})
    return messages


def test_everything_is_kept_when_it_fits() -> None:
    messages = conversation(3)
    fitted = fit_context(messages, context_window=8192, max_tokens=512)
    assert (fitted.messages, fitted.dropped) == (messages, 0)


def test_trimming_drops_oldest_whole_turns_keeps_system_and_latest() -> None:
    messages = conversation(6)
    cost = [estimate_tokens(m) for m in messages]
    # Room for the system prompt, the last two turns and the question, but not three turns.
    window = 100 + cost[0] + sum(cost[-5:]) + 1
    fitted = fit_context(messages, context_window=window, max_tokens=100)
    assert fitted.dropped == 8
    assert fitted.messages == [messages[0], *messages[-5:]]
    assert sum(estimate_tokens(m) for m in fitted.messages) + 100 <= window


def test_a_question_too_long_for_the_window_is_still_sent_alone() -> None:
    messages = conversation(2)
    messages[-1]["content"] = "x" * 50_000
    fitted = fit_context(messages, context_window=1024, max_tokens=256)
    assert fitted.messages == [messages[0], messages[-1]]
    assert fitted.dropped == 4


def test_trimming_without_system_prompt() -> None:
    messages = conversation(4)[1:]
    fitted = fit_context(messages, context_window=300, max_tokens=64)
    assert fitted.messages[0]["role"] == "user"
    assert fitted.messages[-1] == messages[-1]
    assert fitted.dropped == len(messages) - len(fitted.messages) > 0


def test_estimate_is_at_least_one_token_per_three_characters() -> None:
    assert estimate_tokens({"role": "user", "content": "x" * 300}) >= 100
    assert estimate_tokens({"role": "user", "content": ""}) > 0


def test_trim_note_counts_messages() -> None:
    assert trim_note(0) == ""
    assert "1 older message was left out" in trim_note(1)
    assert "4 older messages were left out" in trim_note(4)


def sample_history() -> list[dict]:
    return [
        {"role": "user", "content": parts("Write code")},
        {"role": "assistant", "content": parts("```python\ndef f():\n    return 1\n```")},
        user_message("And again?"),
        notice_message("⚠️ Backend unreachable", "Could not connect.\nRetry later."),
    ]


def test_json_export_import_round_trip() -> None:
    record = to_record(sample_history(), "Code", "Be brief.")
    restored = import_json(export_json(record))
    assert restored == record
    assert to_openai(to_history(restored), restored.system_prompt) == to_openai(
        sample_history(), "Be brief."
    )
    assert to_history(restored)[3]["metadata"] == {"title": "⚠️ Backend unreachable"}
    assert json.loads(export_json(record))["format"] == "chatui-conversation"


def test_exports_keep_a_json_reply_as_it_came_and_reopen_it_as_a_code_block() -> None:
    history = [user_message("a city?"), assistant_message(RAW_JSON, json_output=True)]
    record = to_record(history, "City", "")
    assert record.messages[1].content == RAW_JSON and record.messages[1].json_reply
    exported = json.loads(export_json(record))
    assert exported["messages"][1] == {
        "role": "assistant",
        "content": RAW_JSON,
        "notice": None,
        "json_reply": True,
    }
    restored = import_json(export_json(record))
    assert to_history(restored) == history
    saved, _ = save([], record, None)
    assert to_history(load_saved(json.loads(json.dumps(dump_saved(saved))))[0]) == history
    assert f"### Assistant\n\n````json\n{RAW_JSON}\n````" in export_markdown(record)


def test_exports_keep_the_calls_as_they_came_and_reopen_them_readable() -> None:
    history = [user_message("Weather?"), tool_call_message([WEATHER, TIME]), user_message("18")]
    record = to_record(history, "Weather", "")
    exported = json.loads(export_json(record))
    assert exported["messages"][1] == {
        "role": "assistant",
        "content": "",
        "notice": None,
        "tool_calls": wire(WEATHER, TIME),
    }
    restored = import_json(export_json(record))
    assert to_history(restored) == history
    saved, _ = save([], record, None)
    assert to_history(load_saved(json.loads(json.dumps(dump_saved(saved))))[0]) == history
    assert f"### Assistant\n\n{calls_markdown([WEATHER, TIME])}\n\n### You" in export_markdown(
        record
    )


def test_a_plain_chat_exports_as_it_always_did() -> None:
    exported = json.loads(export_json(to_record(sample_history(), "Code", "")))
    assert all(set(m) == {"role", "content", "notice"} for m in exported["messages"])


def test_markdown_export_shows_speakers_code_and_notices() -> None:
    markdown = export_markdown(to_record(sample_history(), "Code", "Be brief."))
    assert markdown.startswith("# Code\n")
    assert "*System prompt:* Be brief." in markdown
    assert "### You\n\nWrite code" in markdown
    assert "### Assistant\n\n```python\ndef f():\n    return 1\n```" in markdown
    assert "> **⚠️ Backend unreachable**\n>\n> Could not connect.\n> Retry later." in markdown


@pytest.mark.parametrize(
    ("data", "where"),
    [
        ("not json at all", "the file"),
        ('{"title": "t", "messages": [{"role": "robot", "content": "x"}]}', "messages.0.role"),
        ('{"title": "t"}', "messages"),
        ('{"format": "other", "title": "t", "messages": []}', "format"),
        ("[1, 2]", "the file"),
    ],
)
def test_bad_imports_say_what_is_wrong(data: str, where: str) -> None:
    with pytest.raises(ConversationImportError, match="Not a conversation") as info:
        import_json(data)
    assert where in str(info.value)


def test_titles_are_one_shortened_line() -> None:
    assert title_for([user_message("  Hello\n  there  ")]) == "Hello there"
    long_title = title_for([user_message("word " * 40)])
    assert len(long_title) <= 48 and long_title.endswith("…")
    assert title_for([]) == "New chat"


def test_saving_inserts_newest_first_and_replaces_by_id() -> None:
    first = to_record([user_message("one")], "One", "")
    second = to_record([user_message("two")], "Two", "")
    saved, first_id = save([], first, None)
    saved, second_id = save(saved, second, None)
    assert choices(saved) == [("Two", second_id), ("One", first_id)]
    updated = to_record([user_message("one"), assistant_message("1")], "One", "")
    saved, same_id = save(saved, updated, first_id)
    assert same_id == first_id
    assert choices(saved) == [("One", first_id), ("Two", second_id)]
    assert len(find(saved, first_id).messages) == 2
    assert find(saved, "missing") is None


def test_browser_storage_round_trip_skips_unreadable_entries() -> None:
    saved, _ = save([], to_record([user_message("hi")], "Hi", "sys"), None)
    raw = [*dump_saved(saved), {"id": "x", "title": ""}, "garbage"]
    assert load_saved(json.loads(json.dumps(raw))) == saved
    assert load_saved(None) == [] and load_saved({"not": "a list"}) == []


def test_stats_line_reports_ttft_rate_and_tokens() -> None:
    stats = AnswerStats(ttft_s=0.5, total_s=2.5, completion_tokens=41, finish_reason="stop")
    assert stats.tokens_per_s() == pytest.approx(20.0)
    assert stats.to_markdown() == (
        "⏱ 0.50 s to first token · 20.0 tok/s · 41 tokens · 2.50 s in all"
    )


def test_stats_line_reports_the_prompt_tokens_the_backend_reused() -> None:
    stats = AnswerStats(0.5, 2.5, 41, prompt_tokens=950, cached_tokens=900)
    assert "· prompt 950 tokens, 900 reused ·" in stats.to_markdown()


def test_stats_line_without_usage_or_tokens_and_at_the_length_limit() -> None:
    assert AnswerStats(1.0, 1.0, None).to_markdown() == "⏱ 1.00 s to first token · 1.00 s in all"
    assert AnswerStats(None, 0.3, 0).to_markdown() == "0 tokens · 0.30 s in all"
    capped = AnswerStats(0.1, 1.1, 11, finish_reason="length").to_markdown()
    assert capped.endswith("stopped at the max tokens limit")
