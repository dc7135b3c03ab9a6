"""Atomic folder writes: a writer killed mid-way leaves nothing behind once `dest` is written again."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from fedtune.files import clear_leftovers, staged_dir


def _write(dest: Path, text: str) -> None:
    with staged_dir(dest) as staging:
        (staging / "weights").write_text(text)


def test_a_write_replaces_the_folder_whole_and_readably(tmp_path: Path) -> None:
    dest = tmp_path / "checkpoint-1"
    _write(dest, "one")
    _write(dest, "two")
    assert (dest / "weights").read_text() == "two"
    assert oct((dest / "weights").stat().st_mode & 0o777) == oct(0o644)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-1"]


def test_a_failed_write_leaves_the_last_complete_folder(tmp_path: Path) -> None:
    dest = tmp_path / "checkpoint-1"
    _write(dest, "one")
    with pytest.raises(RuntimeError), staged_dir(dest) as staging:
        (staging / "weights").write_text("half")
        raise RuntimeError("killed")
    assert (dest / "weights").read_text() == "one"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-1"]


def test_leftovers_of_a_killed_writer_are_cleared_by_the_next_write(tmp_path: Path) -> None:
    dest = tmp_path / "checkpoint-0.5"
    other = tmp_path / "checkpoint-1"
    _write(other, "kept")
    (tmp_path / ".checkpoint-0.5.tmp-abc").mkdir()  # killed before its rename
    (tmp_path / ".checkpoint-1.tmp-abc").mkdir()  # another folder's: not this write's business
    _write(dest, "new")
    assert sorted(p.name for p in tmp_path.iterdir()) == [".checkpoint-1.tmp-abc", "checkpoint-0.5", "checkpoint-1"]


def test_a_kill_between_the_two_renames_puts_the_last_folder_back(tmp_path: Path) -> None:
    dest = tmp_path / "checkpoint-1"
    _write(dest, "one")
    aside = tmp_path / ".checkpoint-1.old-xyz"
    aside.mkdir()
    os.rename(dest, aside / dest.name)  # replace_dir moved it aside, then the process died
    clear_leftovers(dest)
    assert (dest / "weights").read_text() == "one"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-1"]
