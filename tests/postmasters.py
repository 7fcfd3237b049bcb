"""Find PostgreSQL servers by data directory, so tests can check they stop what they start."""

from __future__ import annotations

from pathlib import Path


def postmasters(under: Path) -> list[int]:
    """The pids of running postmasters whose data directory (``-D``) lies under ``under``.

    A postmaster keeps its argv (``.../postgres -D <pgdata> ...``); its children rename
    themselves (``postgres: checkpointer``), so they do not count.
    """
    root = under.resolve()
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            argv = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:  # gone meanwhile, or not ours to read
            continue
        if not argv or not argv[0].endswith(b"postgres") or b"-D" not in argv:
            continue
        index = argv.index(b"-D") + 1
        if index < len(argv) and Path(argv[index].decode()).resolve().is_relative_to(root):
            found.append(int(proc.name))
    return sorted(found)


def settled(under: Path, expected: list[int], seconds: float = 10.0) -> list[int]:
    """The postmasters under ``under`` once they equal ``expected``, or after ``seconds``.

    ``pg_ctl stop -w`` returns when the pid file is gone, which the postmaster removes just
    before it exits; on a loaded machine the process can outlive that by a moment.
    """
    import time

    deadline = time.monotonic() + seconds
    found = postmasters(under)
    while found != expected and time.monotonic() < deadline:
        time.sleep(0.05)
        found = postmasters(under)
    return found
