"""The README stays true and readable: every setting has its table row with its default, the two
commands are shown, it stays short and leads on to the other documents, lines stay short, links
resolve, and the KubeRay version is left to k8s/README.md."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from pydantic_settings import BaseSettings

from backend.settings import BackendSettings

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text()
MAX_LINE = 100
# The README is for users; what contributors and platform engineers need lives on.
MAX_README_LINES = 300
ONWARD = ["docs/development.md", "docs/engines.md", "k8s/README.md", "docs/benchmarks.md"]
# The documents written by hand (docs/benchmarks.md is written by `make bench`).
WRITTEN = ["README.md", "docs/development.md", "docs/api.md", "docs/settings.md"]
LINKED = [*WRITTEN, "k8s/README.md"]
# A Markdown link or image: [text](target); the target up to a space or the closing parenthesis.
LINK = re.compile(r"\]\(([^)\s]+)\)")
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


def test_readme_stays_short() -> None:
    assert len(README.splitlines()) < MAX_README_LINES


def test_readme_leads_on_to_the_other_documents() -> None:
    targets = {target.partition("#")[0] for target in LINK.findall(README)}
    assert [document for document in ONWARD if document not in targets] == []


@pytest.mark.parametrize("name", WRITTEN)
def test_lines_stay_readable(name: str) -> None:
    long = [
        f"{number}: {len(line)} characters"
        for number, line in enumerate((REPO / name).read_text().splitlines(), start=1)
        if len(line) > MAX_LINE
    ]
    assert long == []


def anchors(text: str) -> set[str]:
    """The anchors GitHub gives a document's headings: lower case, punctuation dropped but `-`
    and `_`, spaces as `-`, a repeated one numbered."""
    seen: dict[str, int] = {}
    found = set()
    for heading in re.findall(r"^#{1,6} (.+)$", text, re.MULTILINE):
        slug = re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")
        count = seen.get(slug, 0)
        seen[slug] = count + 1
        found.add(slug if count == 0 else f"{slug}-{count}")
    return found


def headings_outside_code(path: Path) -> str:
    """The document without its fenced code blocks, whose `#` lines are no headings."""
    return re.sub(r"^```.*?^```", "", path.read_text(), flags=re.MULTILINE | re.DOTALL)


@pytest.mark.parametrize("name", LINKED)
def test_links_resolve(name: str) -> None:
    """Every relative link names a file of the repository and, with `#`, one of its headings."""
    source = REPO / name
    broken = []
    for target in LINK.findall(headings_outside_code(source)):
        if re.match(r"[a-z]+:", target):  # https:, mailto:
            continue
        path, _, anchor = target.partition("#")
        file = (source.parent / path).resolve() if path else source
        missing = not file.exists()
        if missing or (anchor and anchor not in anchors(headings_outside_code(file))):
            broken.append(target)
    assert broken == []


def test_the_kuberay_version_is_left_to_the_k8s_readme() -> None:
    assert re.findall(r"KubeRay\D{0,30}\d+\.\d+", README) == []
