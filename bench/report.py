"""What `make bench` writes: `artifacts/bench.md` (this run) and `docs/benchmarks.md` (every
section, each from the last run that measured it).

Figures live only in what the bench writes, with the commit and the machine they were measured
on; nothing here or in the bench's code holds a measured number. Each section of
`docs/benchmarks.md` sits between marker comments (`<!-- bench:KEY -->` … `<!-- /bench:KEY -->`),
so a section run alone (`python -m bench multiturn`) replaces its own and leaves the rest as the
last full run wrote it.
"""

from __future__ import annotations

import datetime
import importlib.metadata
import os
import platform
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DOCS = REPO / "docs" / "benchmarks.md"
HEADER = "header"  # the key of the section describing the run and the machine

Row = tuple[str, str, str]  # measure, this run, target ("" when none)


@dataclass(frozen=True)
class Section:
    """One table of the report."""

    key: str  # its marker: `<!-- bench:KEY -->`
    title: str
    about: str  # one line: what it measures and the target it is checked against
    rows: list[Row]


@dataclass(frozen=True)
class Provenance:
    """When and on which commit a run measured."""

    date: str
    commit: str
    dirty: bool

    @classmethod
    def current(cls) -> Provenance:
        """Now, and the repository's HEAD and state. The file the bench writes does not count
        as a change: the measured code is the same with or without it."""
        date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
        commit = _git("rev-parse", "--short", "HEAD")
        status = _git("status", "--porcelain", "--", ".", f":!{DOCS.relative_to(REPO)}")
        return cls(date, commit or "unknown", bool(status))

    def describe(self) -> str:
        """`DATE at commit `C`` (and whether the tree had uncommitted changes)."""
        dirty = " with uncommitted changes (dirty tree)" if self.dirty else " (clean tree)"
        return f"{self.date} at commit `{self.commit}`{dirty}"


def _git(*args: str) -> str:
    try:
        done = subprocess.run(
            ["git", *args], cwd=REPO, capture_output=True, text=True, check=True, timeout=30
        )
    except (OSError, subprocess.SubprocessError):
        return ""
    return done.stdout.strip()


def machine(engine_settings: Sequence[str]) -> list[str]:
    """The machine and software the bench runs on, one item a line, ending with
    `engine_settings` (the engines' thread settings the bench used)."""
    cpuinfo = _read("/proc/cpuinfo")
    fields = (line.partition(":") for line in cpuinfo.splitlines())
    model = next(
        (value.strip() for name, _, value in fields if name.strip() == "model name"),
        platform.processor() or "unknown",
    )
    flags = set(cpuinfo.split())
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    ram = _ram_bytes()
    return [
        f"CPU: {model}, {os.cpu_count()} cores ({usable} usable by the bench)",
        "bf16 instructions: "
        + ", ".join(f"`{flag}` {'yes' if flag in flags else 'no'}" for flag in _BF16_FLAGS),
        f"RAM: {ram / 2**30:.1f} GiB" if ram else "RAM: unknown",
        f"OS: {platform.system()} {platform.release()}",
        "Software: Python "
        + platform.python_version()
        + "".join(f", {name} {_version(name)}" for name in _PACKAGES),
        *engine_settings,
    ]


_BF16_FLAGS = ("avx512_bf16", "amx_bf16")  # what `LLM_DTYPE=auto` looks for
_PACKAGES = ("torch", "transformers", "llama-cpp-python", "ray")


def _read(path: str) -> str:
    try:
        return Path(path).read_text()
    except OSError:
        return ""


def _ram_bytes() -> int:
    for line in _read("/proc/meminfo").splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) * 1024
    return 0


def _version(distribution: str) -> str:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def begin(key: str) -> str:
    """The comment that opens section `key`."""
    return f"<!-- bench:{key} -->"


def end(key: str) -> str:
    """The comment that closes section `key`."""
    return f"<!-- /bench:{key} -->"


def replace_section(document: str, key: str, block: str) -> str:
    """`document` with its section `key`, markers included, replaced by `block` (that section
    with its markers); `block` is appended if the document has no such section. Text outside
    the section is kept byte for byte. A section opened twice or not closed is an error: which
    one to replace would be a guess."""
    opening, closing = begin(key), end(key)
    block = block.strip("\n")
    if not (block.startswith(opening) and block.endswith(closing)):
        raise ValueError(f"the new block must start with {opening} and end with {closing}")
    opened, closed = document.count(opening), document.count(closing)
    if opened > 1 or opened != closed:
        raise ValueError(f"{opening} appears {opened} times and {closing} {closed} times")
    if opened == 0:
        return (document.rstrip("\n") + "\n\n" if document.strip() else "") + block + "\n"
    start = document.index(opening)
    stop = document.find(closing, start)
    if stop < 0:
        raise ValueError(f"{closing} comes before {opening}")
    return document[:start] + block + document[stop + len(closing) :]


def table(rows: Sequence[Row]) -> str:
    """Rows as a Markdown table."""
    lines = ["| measure | this run | target |", "|---|---|---|"]
    lines += [f"| {' | '.join(cell.replace('|', '/') for cell in row)} |" for row in rows]
    return "\n".join(lines)


def render_header(provenance: Provenance, machine_lines: Sequence[str]) -> str:
    """The run that wrote the whole file, and its machine, between the header's markers."""
    return "\n".join(
        [
            begin(HEADER),
            "# Benchmarks",
            "",
            f"Generated by `make bench` (`python -m bench`) on {provenance.describe()}. Do not "
            "edit: run the bench. A section can be measured again alone (`python -m bench "
            "multiturn`); each says when it was measured.",
            "",
            "## Machine",
            "",
            *(f"- {line}" for line in machine_lines),
            "",
            end(HEADER),
        ]
    )


def render_section(
    section: Section, provenance: Provenance, machine_lines: Sequence[str] = ()
) -> str:
    """A section between its markers. `machine_lines`, if any, describe the machine it was
    measured on, for a section measured elsewhere than the header says."""
    lines = [begin(section.key), f"## {section.title}", "", section.about, ""]
    lines.append(f"Measured {provenance.describe()}.")
    if machine_lines:
        lines += ["", "On another machine or software than the header's:", ""]
        lines += [f"- {line}" for line in machine_lines]
    lines += ["", table(section.rows), "", end(section.key)]
    return "\n".join(lines)


def render_document(
    sections: Sequence[Section], provenance: Provenance, machine_lines: Sequence[str]
) -> str:
    """A whole report: the header, then every section."""
    blocks = [render_header(provenance, machine_lines)]
    blocks += [render_section(section, provenance) for section in sections]
    return "\n\n".join(blocks) + "\n"


def update_document(
    existing: str,
    sections: Sequence[Section],
    provenance: Provenance,
    machine_lines: Sequence[str],
) -> str:
    """`existing` with `sections` replaced in place (appended if new), the rest untouched. A
    document with no header gets this run's; a header describing another machine stays, and
    the new sections say which machine measured them."""
    document = existing
    if begin(HEADER) not in document:
        header = render_header(provenance, machine_lines)
        document = header + ("\n\n" + document.strip("\n") if document.strip() else "") + "\n"
    start = document.index(begin(HEADER))
    header_lines = set(document[start : document.index(end(HEADER), start)].splitlines())
    elsewhere = any(f"- {line}" not in header_lines for line in machine_lines)
    for section in sections:
        block = render_section(section, provenance, machine_lines if elsewhere else ())
        document = replace_section(document, section.key, block)
    return document


def write(
    sections: Sequence[Section],
    provenance: Provenance,
    machine_lines: Sequence[str],
    *,
    whole: bool,
    docs: Path = DOCS,
    artifact: Path | None = None,
) -> str:
    """Write this run's report to `artifact` and fold it into `docs`: rewritten if the run was
    `whole`, else only its sections replaced. Returns this run's report."""
    report = render_document(sections, provenance, machine_lines)
    if artifact is not None:
        artifact.parent.mkdir(parents=True, exist_ok=True)
        artifact.write_text(report)
    docs.parent.mkdir(parents=True, exist_ok=True)
    if whole or not docs.exists():
        docs.write_text(report)
    else:
        docs.write_text(update_document(docs.read_text(), sections, provenance, machine_lines))
    return report
