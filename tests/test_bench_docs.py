"""docs/benchmarks.md: one section re-measured replaces that section alone, nothing else."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench.report import (
    Provenance,
    Section,
    begin,
    end,
    render_section,
    replace_section,
    update_document,
    write,
)

BEFORE = Provenance("2000-01-01 00:00 UTC", "aaaaaaa", dirty=False)
AFTER = Provenance("2000-01-02 00:00 UTC", "bbbbbbb", dirty=True)
MACHINE = ["CPU: Test CPU, 2 cores (2 usable by the bench)", "RAM: 8.0 GiB"]


def section(key: str, value: str) -> Section:
    return Section(key, key.title(), f"What {key} measures. Target: none.", [(key, value, "")])


def block(key: str, body: str) -> str:
    return f"{begin(key)}\n{body}\n{end(key)}"


def test_replaces_only_the_section_between_its_markers() -> None:
    document = (
        "preamble\n\n"
        + block("start", "start figures")
        + "\n\nbetween\n\n"
        + block("multiturn", "old figures\nover two lines")
        + "\n\n"
        + block("control", "control figures")
        + "\ntrailer\n"
    )
    replaced = replace_section(document, "multiturn", block("multiturn", "new figures"))
    assert replaced == (
        "preamble\n\n"
        + block("start", "start figures")
        + "\n\nbetween\n\n"
        + block("multiturn", "new figures")
        + "\n\n"
        + block("control", "control figures")
        + "\ntrailer\n"
    )
    assert replace_section(replaced, "multiturn", block("multiturn", "new figures")) == replaced


def test_a_key_that_begins_another_key_is_its_own_section() -> None:
    document = block("engine-hf", "hf") + "\n\n" + block("engine", "old") + "\n"
    replaced = replace_section(document, "engine", block("engine", "new"))
    assert replaced == block("engine-hf", "hf") + "\n\n" + block("engine", "new") + "\n"


def test_a_new_section_is_appended() -> None:
    document = block("start", "start figures") + "\n"
    replaced = replace_section(document, "multiturn", block("multiturn", "figures") + "\n\n")
    assert replaced == document + "\n" + block("multiturn", "figures") + "\n"
    assert (
        replace_section("", "multiturn", block("multiturn", "x")) == block("multiturn", "x") + "\n"
    )


@pytest.mark.parametrize(
    "document",
    [
        block("multiturn", "one") + "\n" + block("multiturn", "two"),  # twice
        f"{begin('multiturn')}\nnever closed\n",
        f"{end('multiturn')}\n{begin('multiturn')}\n",  # closed before it opens
    ],
    ids=["twice", "unclosed", "reversed"],
)
def test_a_malformed_section_is_an_error_not_a_guess(document: str) -> None:
    with pytest.raises(ValueError):
        replace_section(document, "multiturn", block("multiturn", "new"))


def test_the_new_block_must_carry_the_sections_markers() -> None:
    with pytest.raises(ValueError):
        replace_section(block("start", "x"), "start", block("multiturn", "y"))


def test_a_section_run_alone_updates_only_its_own(tmp_path: Path) -> None:
    docs, artifact = tmp_path / "docs" / "benchmarks.md", tmp_path / "artifacts" / "bench.md"
    full = [section("start", "1 s"), section("multiturn", "1.10"), section("control", "50 ms")]
    write(full, BEFORE, MACHINE, whole=True, docs=docs, artifact=artifact)
    first = docs.read_text()
    assert first == artifact.read_text()
    assert "aaaaaaa" in first and "clean tree" in first and "- RAM: 8.0 GiB" in first

    write([section("multiturn", "1.20")], AFTER, MACHINE, whole=False, docs=docs, artifact=artifact)
    second = docs.read_text()
    new_block = render_section(section("multiturn", "1.20"), AFTER)
    start, stop = first.index(begin("multiturn")), first.index(end("multiturn"))
    assert second == first[:start] + new_block + first[stop + len(end("multiturn")) :]
    assert "| multiturn | 1.20 |  |" in second and "1.10" not in second
    assert "bbbbbbb" in second and "dirty tree" in second
    assert "On another machine" not in second  # the header's machine measured it
    assert "bbbbbbb" in artifact.read_text() and "| start |" not in artifact.read_text()

    write(full[:1], AFTER, MACHINE, whole=True, docs=docs)  # a whole run rewrites the file
    assert begin("multiturn") not in docs.read_text()


def test_a_section_measured_on_another_machine_says_so() -> None:
    existing = update_document("", [section("start", "1 s")], BEFORE, MACHINE)
    elsewhere = ["CPU: Other CPU, 4 cores (4 usable by the bench)", "RAM: 8.0 GiB"]
    updated = update_document(existing, [section("multiturn", "1.2")], AFTER, elsewhere)
    own = updated[updated.index(begin("multiturn")) :]
    assert "On another machine" in own and "- CPU: Other CPU" in own
    assert "- CPU: Test CPU" in updated[: updated.index(end("header"))]  # the header stays
