"""The reference agent's sandbox: O_NOFOLLOW relative to the sandbox, no hard links, relative
paths only in answers."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from cpa_scheduler import errors
from cpa_scheduler.sandbox import Sandbox


def test_writes_and_reads_inside(tmp_path: Path) -> None:
    box = Sandbox(tmp_path / "box")
    answer = box.write("/notes/a.txt", b"Hallo")
    assert answer == {"path": "notes/a.txt", "bytes": 5}
    assert (tmp_path / "box" / "notes" / "a.txt").read_text() == "Hallo"
    assert box.read("notes/a.txt") == "Hallo"
    assert str(tmp_path) not in str(answer)


@pytest.mark.parametrize("name", ["../x", "a/../../x", "", "/"])
def test_paths_outside_are_refused(tmp_path: Path, name: str) -> None:
    with pytest.raises(errors.PermanentError, match="outside the agent's sandbox"):
        Sandbox(tmp_path / "box").write(name, b"x")


def test_symlinked_file_and_folder_are_refused(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret").write_text("keep")
    box = Sandbox(tmp_path / "box")
    (tmp_path / "box" / "file").symlink_to(outside / "secret")
    (tmp_path / "box" / "dir").symlink_to(outside)
    with pytest.raises(errors.PermanentError, match="symbolic link") as info:
        box.write("file", b"pwned")
    assert str(tmp_path) not in info.value.message
    with pytest.raises(errors.PermanentError, match="symbolic link"):
        box.write("dir/secret", b"pwned")
    with pytest.raises(errors.PermanentError, match="symbolic link"):
        box.read("dir/secret")
    assert (outside / "secret").read_text() == "keep"


def test_hard_links_are_refused_and_not_truncated(tmp_path: Path) -> None:
    outside = tmp_path / "secret"
    outside.write_text("keep")
    box = Sandbox(tmp_path / "box")
    os.link(outside, tmp_path / "box" / "linked")
    with pytest.raises(errors.PermanentError, match="hard links"):
        box.write("linked", b"pwned")
    with pytest.raises(errors.PermanentError, match="hard links"):
        box.read("linked")
    assert outside.read_text() == "keep"


def test_read_text_is_storable(tmp_path: Path) -> None:
    box = Sandbox(tmp_path / "box")
    box.write("bin", b"a\x00b\xffc")
    assert box.read("bin") == "a\ufffdb\ufffdc"
