"""The README stays true and readable: every setting has its table row with its default, the two
commands are shown, lines stay short, and the KubeRay version is left to k8s/README.md."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from pydantic_settings import BaseSettings

from backend.settings import BackendSettings

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()
MAX_LINE = 100
# A settings table row: | `LLM_PORT` | `8000` | HTTP port |
ROW = re.compile(r"^\| `((?:LLM|CHATUI)_[A-Z0-9_]+)` \| ([^|]+) \| ([^|]+) \|$", re.MULTILINE)


def settings_classes() -> list[type[BaseSettings]]:
    from chatui.settings import ChatUISettings

    return [BackendSettings, ChatUISettings]


def documented() -> dict[str, tuple[str, str]]:
    """Setting name -> (default, meaning), from the README's settings tables."""
    rows: dict[str, tuple[str, str]] = {}
    for name, default, meaning in ROW.findall(README):
        assert name not in rows, f"{name} has two rows"
        rows[name] = (default.strip(), meaning.strip())
    return rows


def env_names(cls: type[BaseSettings]) -> dict[str, str]:
    """Environment variable -> field name."""
    prefix = cls.model_config["env_prefix"]
    return {f"{prefix}{name.upper()}": name for name in cls.model_fields}


def shown_default(value: object) -> str:
    """How the tables write a field's default."""
    if value is None:
        return "*(unset)*"
    if value == "":
        return "*(empty)*"
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    if isinstance(value, Path) and value.is_relative_to(Path.home()):
        return f"`~/{value.relative_to(Path.home())}`"
    return f"`{value}`"


@pytest.mark.parametrize("cls", settings_classes(), ids=lambda c: c.__name__)
def test_every_setting_has_a_table_row(cls: type[BaseSettings]) -> None:
    rows = documented()
    missing = [name for name in env_names(cls) if name not in rows]
    assert missing == []


@pytest.mark.parametrize("cls", settings_classes(), ids=lambda c: c.__name__)
def test_every_row_states_the_default_and_a_meaning(cls: type[BaseSettings]) -> None:
    rows = documented()
    wrong = {
        env: (rows[env][0], shown_default(cls.model_fields[field].default))
        for env, field in env_names(cls).items()
        if env in rows and rows[env][0] != shown_default(cls.model_fields[field].default)
    }
    assert wrong == {}, "README default, actual default"
    assert [env for env in env_names(cls) if env in rows and not rows[env][1]] == []


def test_no_row_documents_a_setting_that_does_not_exist() -> None:
    known = {env for cls in settings_classes() for env in env_names(cls)}
    assert sorted(set(documented()) - known) == []


def test_readme_shows_the_two_commands() -> None:
    assert "make run" in README and "make test" in README


def test_lines_stay_readable() -> None:
    long = [
        f"{number}: {len(line)} characters"
        for number, line in enumerate(README.splitlines(), start=1)
        if len(line) > MAX_LINE
    ]
    assert long == []


def test_the_kuberay_version_is_left_to_the_k8s_readme() -> None:
    assert re.findall(r"KubeRay\D{0,30}\d+\.\d+", README) == []
