"""UI configuration: every knob is a `CHATUI_*` environment variable, validated once at start."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Literal

import httpx
from pydantic import Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from chatui.tools import AUTO, MODES, ToolsError, tool_request

ENV_PREFIX = "CHATUI_"

logger = logging.getLogger(__name__)


class SettingsError(ValueError):
    """Raised by `load_settings` when the environment holds invalid values; says how to fix them."""


class ChatUISettings(BaseSettings):
    """Settings of the Gradio chat UI (env prefix `CHATUI_`)."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="ignore")

    backend_url: str = Field(
        "http://127.0.0.1:8000",
        description="Base URL of the backend (in the cluster: the Ray Serve service on :8000).",
    )
    backend_api: Literal["openai", "infer"] = Field(
        "openai",
        description="Backend API: `openai` (streamed Chat Completions) or `infer` (the "
        "blueprint's `GET /infer`, last message only, no streaming).",
    )
    host: str = Field("127.0.0.1", description="HTTP bind address (the container sets 0.0.0.0).")
    port: int = Field(7860, ge=1, le=65535, description="HTTP port of the UI.")
    connect_timeout_s: float = Field(
        5.0, gt=0, description="Seconds to wait for a connection to the backend."
    )
    read_timeout_s: float = Field(
        120.0,
        gt=0,
        description="Seconds to wait for the next piece of a reply (the first token included).",
    )
    auth: SecretStr | None = Field(
        None, description="`user:password` turns on the login page; unset = no login."
    )
    auth_file: Path | None = Field(
        None,
        description="A file holding CHATUI_AUTH's value (a mounted Secret); read at start, "
        "instead of CHATUI_AUTH. A file that does not exist (an optional Secret not created) "
        "means no login, with a warning.",
    )
    api_key: SecretStr | None = Field(
        None, description="Bearer token sent to the backend; unset = no Authorization header."
    )
    api_key_file: Path | None = Field(
        None,
        description="A file holding the bearer token (a mounted Secret); read at start, "
        "instead of CHATUI_API_KEY.",
    )
    concurrency_limit: int = Field(
        32, ge=1, description="Replies streamed at once across all users (more wait in a queue)."
    )
    system_prompt: str = Field(
        "",
        description="Default system prompt (editable in the UI); empty = none is sent, so the "
        "model's chat template applies its own default, if it has one.",
    )
    temperature: float = Field(
        0.7, ge=0.0, le=2.0, description="Default sampling temperature (editable in the UI)."
    )
    top_p: float = Field(
        0.9, gt=0.0, le=1.0, description="Default nucleus sampling top_p (editable in the UI)."
    )
    max_tokens: int = Field(
        512, ge=1, description="Default longest reply in tokens (editable in the UI)."
    )
    json_output: bool = Field(
        False,
        description="Default of the JSON output toggle (editable in the UI): ask for replies "
        "that are one JSON object (`response_format` `json_object`); needs the `openai` API.",
    )
    tools: str = Field(
        "",
        description="Default of the Tools box (editable in the UI): an OpenAI `tools` JSON list "
        "of function definitions; empty = a plain chat; needs the `openai` API.",
    )
    tool_choice: str = Field(
        AUTO,
        description="Default tool choice (editable in the UI): `auto` (the model answers or "
        "calls: it decides), `required` (it calls any of the functions) or the name of one "
        "function of CHATUI_TOOLS.",
    )
    health_poll_interval_s: float = Field(
        5.0, ge=0.5, description="Seconds between two backend health checks (the status line)."
    )
    default_context_window: int = Field(
        4096,
        ge=256,
        description="Context window in tokens assumed when the backend reports none "
        "(`/v1/models` without `max_model_len`, or the `infer` API).",
    )

    @field_validator("backend_url")
    @classmethod
    def _check_url(cls, value: str) -> str:
        hint = "must be an http(s) URL such as http://127.0.0.1:8000"
        try:
            url = httpx.URL(value)
        except httpx.InvalidURL as exc:
            raise ValueError(f"{hint} ({exc})") from exc
        if url.scheme not in ("http", "https") or not url.host:
            raise ValueError(hint)
        # Paths are appended to it ("/v1/models"), so a trailing slash would double up.
        return value.rstrip("/")

    @field_validator("auth")
    @classmethod
    def _check_auth(cls, value: SecretStr | None) -> SecretStr | None:
        if value is None or not value.get_secret_value():
            return None
        user, sep, password = value.get_secret_value().partition(":")
        if not (sep and user and password):
            raise ValueError("must look like user:password (both parts non-empty), or be unset")
        return value

    @field_validator("api_key")
    @classmethod
    def _empty_key_is_none(cls, value: SecretStr | None) -> SecretStr | None:
        return value if value is not None and value.get_secret_value() else None

    @model_validator(mode="after")
    def _key_from_file(self) -> ChatUISettings:
        if self.api_key_file is None:
            return self
        if self.api_key is not None:
            raise ValueError(f"set {ENV_PREFIX}API_KEY or {ENV_PREFIX}API_KEY_FILE, not both")
        try:
            key = self.api_key_file.read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise ValueError(f"{ENV_PREFIX}API_KEY_FILE cannot be read: {exc}") from exc
        if not key:
            raise ValueError(f"{ENV_PREFIX}API_KEY_FILE ({self.api_key_file}) is empty")
        self.api_key = SecretStr(key)
        return self

    @model_validator(mode="after")
    def _auth_from_file(self) -> ChatUISettings:
        if self.auth_file is None:
            return self
        if self.auth is not None:
            raise ValueError(f"set {ENV_PREFIX}AUTH or {ENV_PREFIX}AUTH_FILE, not both")
        # The cluster mounts the login Secret as an optional volume: without the Secret the
        # file is absent and the UI runs open, as it did when the Secret fed an env variable.
        if not self.auth_file.exists():
            logger.warning("%sAUTH_FILE %s does not exist: no login", ENV_PREFIX, self.auth_file)
            return self
        try:
            raw = self.auth_file.read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise ValueError(f"{ENV_PREFIX}AUTH_FILE cannot be read: {exc}") from exc
        # A file that is there but empty or malformed is a mistake, not a wish for no login.
        user, sep, password = raw.partition(":")
        if not (sep and user and password):
            raise ValueError(
                f"{ENV_PREFIX}AUTH_FILE ({self.auth_file}) must hold user:password "
                "(both parts non-empty)"
            )
        self.auth = SecretStr(raw)
        return self

    @model_validator(mode="after")
    def _reply_fits_the_window(self) -> ChatUISettings:
        if self.max_tokens >= self.default_context_window:
            raise ValueError(
                f"{ENV_PREFIX}MAX_TOKENS ({self.max_tokens}) must be smaller than "
                f"{ENV_PREFIX}DEFAULT_CONTEXT_WINDOW ({self.default_context_window}): "
                "lower the first or raise the second"
            )
        return self

    @model_validator(mode="after")
    def _json_needs_openai(self) -> ChatUISettings:
        if self.json_output and self.backend_api != "openai":
            raise ValueError(
                f"{ENV_PREFIX}JSON_OUTPUT needs {ENV_PREFIX}BACKEND_API=openai: the `infer` API "
                "cannot constrain a reply to JSON; unset the first or change the second"
            )
        return self

    @model_validator(mode="after")
    def _tools_can_be_sent(self) -> ChatUISettings:
        try:
            tools = tool_request(self.tools, self.tool_choice, json_output=self.json_output)
        except ToolsError as exc:
            raise ValueError(f"{ENV_PREFIX}TOOLS or {ENV_PREFIX}TOOL_CHOICE: {exc}") from exc
        if tools is None and self.tool_choice not in MODES:
            raise ValueError(f"{ENV_PREFIX}TOOL_CHOICE names a function: set {ENV_PREFIX}TOOLS")
        if tools is not None and self.backend_api != "openai":
            raise ValueError(
                f"{ENV_PREFIX}TOOLS needs {ENV_PREFIX}BACKEND_API=openai: the `infer` API cannot "
                "ask for tool calls; unset the first or change the second"
            )
        return self

    def auth_credentials(self) -> tuple[str, str] | None:
        """`(user, password)` for Gradio's login, or None when neither `CHATUI_AUTH` nor an
        existing `CHATUI_AUTH_FILE` gives one."""
        if self.auth is None:
            return None
        user, _, password = self.auth.get_secret_value().partition(":")
        return user, password


def load_settings() -> ChatUISettings:
    """Read and validate the environment once; `SettingsError` names each bad variable."""
    try:
        return ChatUISettings()
    except ValidationError as exc:
        raise SettingsError(_explain(exc)) from exc


def _explain(exc: ValidationError) -> str:
    lines = ["Invalid UI settings; fix these environment variables:"]
    for error in exc.errors():
        name = str(error["loc"][0]) if error["loc"] else ""
        message = error["msg"].removeprefix("Value error, ")
        if name in ChatUISettings.model_fields:
            description = ChatUISettings.model_fields[name].description
            lines.append(f"  {ENV_PREFIX}{name.upper()}: {message} — {description}")
        else:
            lines.append(f"  {message}")
    return "\n".join(lines)
