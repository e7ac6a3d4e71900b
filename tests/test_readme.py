"""The README stays true: every setting is documented and the two commands are shown."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic_settings import BaseSettings

from backend.settings import BackendSettings

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()


def settings_classes() -> list[type[BaseSettings]]:
    from chatui.settings import ChatUISettings

    return [BackendSettings, ChatUISettings]


@pytest.mark.parametrize("cls", settings_classes(), ids=lambda c: c.__name__)
def test_every_setting_is_in_the_readme_table(cls: type[BaseSettings]) -> None:
    prefix = cls.model_config["env_prefix"]
    missing = [
        f"{prefix}{name.upper()}"
        for name in cls.model_fields
        if f"| `{prefix}{name.upper()}` |" not in README
    ]
    assert missing == []


def test_readme_shows_the_two_commands() -> None:
    assert "make run" in README and "make test" in README
