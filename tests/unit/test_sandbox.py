"""The reference agent's sandbox: O_NOFOLLOW relative to the sandbox, no hard links, relative
paths only in answers."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
from cpa_scheduler import errors, sandbox
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


def test_a_fifo_is_refused_at_once_for_reading_and_writing(tmp_path: Path) -> None:
    box = Sandbox(tmp_path)
    os.mkfifo(tmp_path / "pipe")
    started = time.monotonic()
    with pytest.raises(errors.PermanentError, match="FIFO"):
        box.read("pipe")
    with pytest.raises(errors.PermanentError, match="FIFO"):
        box.write("pipe", b"x")
    assert time.monotonic() - started < 2  # no open that waits for the other end


def test_reads_are_bounded_by_size_and_time(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    box = Sandbox(tmp_path)
    (tmp_path / "big").write_bytes(b"x" * (sandbox.MAX_READ + 1))
    with pytest.raises(errors.PermanentError, match="larger than"):
        box.read("big")
    (tmp_path / "slow").write_bytes(b"y" * (3 * 64 * 1024))
    monkeypatch.setattr(sandbox, "READ_SECONDS", -1.0)  # every chunk comes too late
    with pytest.raises(errors.PermanentError, match="took longer"):
        box.read("slow")


async def test_the_agent_gives_up_on_a_stuck_action(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from cpa_scheduler import desktop, protocol

    def stuck(assign: object, where: Path) -> None:
        time.sleep(1)

    monkeypatch.setattr(desktop, "perform", stuck)
    monkeypatch.setattr(desktop, "ACTION_SECONDS", 0.1)
    assign = protocol.make(
        "assign",
        {"todo_id": "00000000-0000-0000-0000-000000000001", "job_id":
         "00000000-0000-0000-0000-000000000002", "key": "r", "action": "file.read",
         "params": {"path": "x"}},
        sender="scheduler", receiver="agent",
    )  # fmt: skip
    with pytest.raises(errors.PermanentError, match="did not finish"):
        await desktop.perform_bounded(assign, tmp_path)  # type: ignore[arg-type]
