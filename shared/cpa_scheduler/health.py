"""A dispatcher's health: its supervision state (faults, backoff, readiness) and the
liveness of the other dispatchers on this host (whose leases a successor may reclaim)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from cpa_scheduler import errors

log = logging.getLogger("cpa.dispatch")


@dataclass
class Health:
    """A dispatcher's liveness: its last successful database round trip and its fault streak.

    ``serve``'s ``/readyz`` and the worker read it. A fault is logged with its cause and
    answers the pause before the next try: exponential from 0.25 s, capped at ``backoff_cap``.
    """

    backoff_cap: float = 2.0
    stale_after: float = 90.0
    started: float = field(default_factory=time.monotonic)
    last_ok: float | None = None
    last_beat: float = field(default_factory=time.monotonic)
    failures: int = 0  # consecutive
    failing_since: float | None = None
    last_error: str | None = None
    last_exc: BaseException | None = None
    running: bool = False

    def ok(self) -> None:
        now = time.monotonic()
        if self.failing_since is not None:
            log.warning("dispatcher: the database answers again after %.1f s",
                        now - self.failing_since)  # fmt: skip
        self.last_ok = self.last_beat = now
        self.failures, self.failing_since = 0, None

    def beat(self) -> None:
        self.last_beat = time.monotonic()

    def fault(self, where: str, exc: BaseException) -> float:
        now = time.monotonic()
        self.last_beat = now  # retrying is progress: the watchdog is for hangs, not outages
        self.failures += 1
        self.failing_since = self.failing_since or now
        cause = exc.message if isinstance(exc, errors.CpaError) else repr(exc)
        self.last_error, self.last_exc = f"{where}: {cause}", exc
        delay = min(self.backoff_cap, 0.25 * float(2 ** min(self.failures - 1, 16)))
        log.warning("dispatcher: %s failed (%d in a row), next try in %.2f s: %s",
                    where, self.failures, delay, cause)  # fmt: skip
        return delay

    def down_for(self) -> float:
        """Seconds since the current fault streak began (0 when healthy)."""
        return 0.0 if self.failing_since is None else time.monotonic() - self.failing_since

    @property
    def ready(self) -> bool:
        fresh = time.monotonic() - self.last_beat < self.stale_after
        return self.running and self.failures == 0 and self.last_ok is not None and fresh

    def snapshot(self) -> dict[str, Any]:
        now = time.monotonic()
        if not self.running:
            status = "stopped"
        elif self.failures:
            status = "failing"
        elif self.last_ok is None:
            status = "starting"
        else:
            status = "ready" if self.ready else "stalled"
        return {
            "status": status,
            "last_ok_seconds_ago": None if self.last_ok is None else round(now - self.last_ok, 3),
            "failures": self.failures,
            "down_seconds": round(self.down_for(), 3),
            "last_error": self.last_error,
        }


async def _sleep_unless(stop: asyncio.Event, seconds: float) -> None:
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), timeout=seconds)


def owner_name() -> str:
    """A lease owner naming this host and process, so a successor can prove it dead."""
    return f"dispatcher:{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


def dead_owners(owners: list[str], me: str) -> list[str]:
    """The dispatcher owners on this host whose process is provably gone.

    Provably: the pid no longer exists, or it is this very process under an older name (a
    restarted container reuses its pid). Any other live pid might be the owner: it is left to
    its lease.
    """
    _, host, pid, _ = me.split(":", 3)
    dead = []
    for owner in owners:
        parts = owner.split(":")
        if len(parts) != 4 or parts[0] != "dispatcher" or parts[1] != host or owner == me:
            continue
        try:
            other = int(parts[2])
        except ValueError:
            continue
        if other == int(pid):
            dead.append(owner)
            continue
        try:
            os.kill(other, 0)
        except ProcessLookupError:
            dead.append(owner)
        except PermissionError:
            pass  # it exists (another user's process)
    return dead
