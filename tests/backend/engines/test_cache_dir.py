"""A cache directory appears whole or not at all."""

from __future__ import annotations

from pathlib import Path

import pytest

from backend.engines.cache_dir import write_atomically


def write_files(staging: Path) -> None:
    (staging / "config.json").write_text("{}")
    (staging / "weights.bin").write_bytes(b"\0" * 16)


def test_the_directory_appears_whole(tmp_path: Path) -> None:
    target = tmp_path / "cache" / "model"
    write_atomically(target, write_files, "config.json")
    assert sorted(p.name for p in target.iterdir()) == ["config.json", "weights.bin"]
    assert [p.name for p in target.parent.iterdir()] == ["model"]  # no staging left behind


def test_an_interrupted_write_leaves_nothing(tmp_path: Path) -> None:
    def half(staging: Path) -> None:
        (staging / "weights.bin").write_bytes(b"\0")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        write_atomically(tmp_path / "model", half, "config.json")
    assert list(tmp_path.iterdir()) == []


def test_a_directory_another_process_finished_first_is_kept(tmp_path: Path) -> None:
    target = tmp_path / "model"
    write_atomically(target, write_files, "config.json")
    (target / "theirs").write_text("kept")
    write_atomically(target, write_files, "config.json")  # the rename fails: target is not empty
    assert (target / "theirs").read_text() == "kept"
    assert [p.name for p in tmp_path.iterdir()] == ["model"]
