"""Find PostgreSQL servers by data directory, so tests can check they stop what they start."""

from __future__ import annotations

from pathlib import Path


def postmasters(under: Path) -> list[int]:
    """The pids of running postmasters whose data directory (``-D``) lies under ``under``.

    A postmaster keeps its argv (``.../postgres -D <pgdata> ...``); its children rename
    themselves (``postgres: checkpointer``), so they do not count. A child caught between its
    fork and its rename still shows the postmaster's argv, so a process whose parent is one of
    the found postmasters is a child, not a second server.
    """
    root = under.resolve()
    found: dict[int, int] = {}
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
            parent = _parent(proc)
            if parent is not None:
                found[int(proc.name)] = parent
    return sorted(pid for pid, parent in found.items() if parent not in found)


def _parent(proc: Path) -> int | None:
    try:
        stat = (proc / "stat").read_text()
    except OSError:
        return None
    # "pid (comm) state ppid ...": comm may hold spaces and parentheses, so split after the last ")".
    return int(stat.rsplit(")", 1)[1].split()[1])


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
