"""UI settings from the environment, validated once with messages that say how to fix them."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from chatui.settings import ChatUISettings, SettingsError, load_settings


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """No `CHATUI_*` variable of the developer's shell leaks into a test."""
    for name in list(os.environ):
        if name.startswith("CHATUI_"):
            monkeypatch.delenv(name)


def test_defaults_talk_to_a_local_openai_backend() -> None:
    settings = load_settings()
    assert (settings.backend_url, settings.backend_api) == ("http://127.0.0.1:8000", "openai")
    assert (settings.host, settings.port) == ("127.0.0.1", 7860)
    assert (settings.temperature, settings.top_p, settings.max_tokens) == (0.7, 0.9, 512)
    assert settings.system_prompt == ""  # the model's own default applies
    assert settings.json_output is False  # plain chat unless the user ticks JSON output
    assert settings.auth_credentials() is None and settings.api_key is None


def test_every_setting_has_a_description() -> None:
    assert all(field.description for field in ChatUISettings.model_fields.values())


def test_environment_overrides(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CHATUI_BACKEND_URL", "http://mistral-serve-svc.mistral.svc:8000/")
    monkeypatch.setenv("CHATUI_BACKEND_API", "infer")
    monkeypatch.setenv("CHATUI_HOST", "0.0.0.0")
    monkeypatch.setenv("CHATUI_AUTH", "admin:hunter:2")
    monkeypatch.setenv("CHATUI_API_KEY", "s3cr3t-key")
    monkeypatch.setenv("CHATUI_CONCURRENCY_LIMIT", "4")
    settings = load_settings()
    assert settings.backend_url == "http://mistral-serve-svc.mistral.svc:8000"  # no trailing /
    assert (settings.backend_api, settings.host, settings.concurrency_limit) == (
        "infer",
        "0.0.0.0",
        4,
    )
    assert settings.auth_credentials() == ("admin", "hunter:2")  # the password may hold a colon
    assert settings.api_key is not None and settings.api_key.get_secret_value() == "s3cr3t-key"
    assert "hunter" not in repr(settings) and "s3cr3t" not in repr(settings)


def test_the_api_key_can_come_from_a_mounted_secret_file(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    secret = tmp_path / "api-key"
    secret.write_text("s3cr3t-key\n")
    monkeypatch.setenv("CHATUI_API_KEY_FILE", str(secret))
    settings = load_settings()
    assert settings.api_key is not None and settings.api_key.get_secret_value() == "s3cr3t-key"
    monkeypatch.setenv("CHATUI_API_KEY_FILE", str(tmp_path / "missing"))
    with pytest.raises(SettingsError, match="CHATUI_API_KEY_FILE cannot be read"):
        load_settings()


def test_the_login_can_come_from_a_mounted_secret_file(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    secret = tmp_path / "auth"
    secret.write_text("admin:hunter:2\n")
    monkeypatch.setenv("CHATUI_AUTH_FILE", str(secret))
    settings = load_settings()
    assert settings.auth_credentials() == ("admin", "hunter:2")
    assert "hunter" not in repr(settings)


def test_a_login_file_that_is_not_there_means_no_login(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The cluster mounts the login Secret as an optional volume: no Secret, no file, no login
    (as the optional env variable was), and the log says so."""
    monkeypatch.setenv("CHATUI_AUTH_FILE", str(tmp_path / "auth"))
    with caplog.at_level("WARNING", logger="chatui.settings"):
        assert load_settings().auth_credentials() is None
    assert "CHATUI_AUTH_FILE" in caplog.text and "no login" in caplog.text


@pytest.mark.parametrize(
    ("content", "hint"),
    [("", "must hold user:password"), ("justauser\n", "must hold user:password")],
)
def test_a_login_file_that_is_there_must_hold_a_login(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, content: str, hint: str
) -> None:
    secret = tmp_path / "auth"
    secret.write_text(content)
    monkeypatch.setenv("CHATUI_AUTH_FILE", str(secret))
    with pytest.raises(SettingsError, match=hint) as info:
        load_settings()
    assert "justauser" not in str(info.value)


def test_the_login_is_set_once(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    secret = tmp_path / "auth"
    secret.write_text("admin:pw")
    monkeypatch.setenv("CHATUI_AUTH_FILE", str(secret))
    monkeypatch.setenv("CHATUI_AUTH", "other:pw")
    with pytest.raises(SettingsError, match="set CHATUI_AUTH or CHATUI_AUTH_FILE, not both"):
        load_settings()


def test_empty_optional_secrets_mean_unset(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CHATUI_AUTH", "")
    monkeypatch.setenv("CHATUI_API_KEY", "")
    settings = load_settings()
    assert settings.auth_credentials() is None and settings.api_key is None


@pytest.mark.parametrize(
    ("name", "value", "hint"),
    [
        ("CHATUI_BACKEND_URL", "localhost:8000", "http(s) URL such as"),
        ("CHATUI_BACKEND_URL", "http://", "http(s) URL such as"),
        ("CHATUI_BACKEND_API", "grpc", "'openai' or 'infer'"),
        ("CHATUI_PORT", "70000", "65535"),
        ("CHATUI_AUTH", "justauser", "user:password"),
        ("CHATUI_TEMPERATURE", "3", "2"),
        ("CHATUI_CONCURRENCY_LIMIT", "0", "greater than or equal to 1"),
    ],
)
def test_invalid_values_name_the_variable_and_the_fix(
    monkeypatch: pytest.MonkeyPatch, name: str, value: str, hint: str
) -> None:
    monkeypatch.setenv(name, value)
    with pytest.raises(SettingsError) as info:
        load_settings()
    message = str(info.value)
    assert f"  {name}: " in message and hint in message
    assert "justauser" not in message  # secrets are not echoed


def test_json_output_can_be_on_by_default_but_not_over_the_infer_api(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("CHATUI_JSON_OUTPUT", "true")
    assert load_settings().json_output is True
    monkeypatch.setenv("CHATUI_BACKEND_API", "infer")
    with pytest.raises(SettingsError, match=r"CHATUI_JSON_OUTPUT needs CHATUI_BACKEND_API=openai"):
        load_settings()


def test_reply_budget_must_fit_the_default_window(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CHATUI_MAX_TOKENS", "4096")
    monkeypatch.setenv("CHATUI_DEFAULT_CONTEXT_WINDOW", "4096")
    with pytest.raises(SettingsError, match=r"CHATUI_MAX_TOKENS \(4096\) must be smaller than"):
        load_settings()


def test_all_errors_are_reported_at_once(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CHATUI_PORT", "0")
    monkeypatch.setenv("CHATUI_TOP_P", "0")
    with pytest.raises(SettingsError) as info:
        load_settings()
    message = str(info.value)
    assert "CHATUI_PORT" in message and "CHATUI_TOP_P" in message


WEATHER = '[{"type": "function", "function": {"name": "get_weather"}}]'


def test_tools_default_to_none_and_a_named_choice_must_be_defined(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    settings = load_settings()
    assert (settings.tools, settings.tool_choice) == ("", "auto")  # a plain chat
    monkeypatch.setenv("CHATUI_TOOLS", WEATHER)
    monkeypatch.setenv("CHATUI_TOOL_CHOICE", "get_weather")
    assert (load_settings().tools, load_settings().tool_choice) == (WEATHER, "get_weather")
    monkeypatch.setenv("CHATUI_TOOL_CHOICE", "get_news")
    with pytest.raises(SettingsError, match="'get_news' is not a function of Tools"):
        load_settings()
    monkeypatch.delenv("CHATUI_TOOLS")
    with pytest.raises(SettingsError, match="CHATUI_TOOL_CHOICE names a function: set"):
        load_settings()


@pytest.mark.parametrize(
    ("env", "says"),
    [
        ({"CHATUI_TOOLS": "[{"}, "CHATUI_TOOLS or CHATUI_TOOL_CHOICE: Tools is not valid JSON"),
        ({"CHATUI_TOOLS": '{"name": "f"}'}, "Tools must be a JSON list of"),
        ({"CHATUI_JSON_OUTPUT": "true"}, "JSON output and tools cannot be combined"),
        ({"CHATUI_BACKEND_API": "infer"}, "CHATUI_TOOLS needs CHATUI_BACKEND_API=openai"),
    ],
)
def test_tools_that_cannot_be_sent_are_refused_at_start(
    monkeypatch: pytest.MonkeyPatch, env: dict[str, str], says: str
) -> None:
    monkeypatch.setenv("CHATUI_TOOLS", WEATHER)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(SettingsError, match=re.escape(says)):
        load_settings()
